"""`parallel.sequence_parallel`: SP at TP=2 equals TP=1 and a float64 reference through the trainer's update.

    .venv/bin/python -m pytest tests/test_train_sp.py -q

On two gloo ranks, megafork's Qwen3 (local spec, fp32; megatron's torch norm under SP through
`megafork.compat`) runs the trainer's old pass, top-50% selection and `train_minibatches` with
megatron DDP + Adam, at TP=1 (DP=2), TP=2 and TP=2 with SP. Micro-batches are padded to a
multiple of TP under SP. For each layout the summed loss and every gradient in main_grad after
the update (exported under HF names, the RMSNorm weights of every layer, q/k norms and the final
norm included) must equal d/dθ [Σ DAPO token loss / response tokens] of a float64 transformers
model on the same micro-batches; SP must also equal TP=2 without SP after the Adam step.
"""
from __future__ import annotations

import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

LAYOUTS = [(1, False), (2, False), (2, True)]
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0)


def _worker(rank, world, hf_dir):
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import export_hf_tensors
    from megafork.testing.update_step import build_policy, trajectories, update_once
    from megafork.train.config import ModelConfig, OptimConfig

    out = {}
    for tp, sp in LAYOUTS:
        groups = init_distributed(ParallelConfig(tp=tp, sequence_parallel=sp))
        policy = build_policy(hf_dir, groups, ModelConfig(), OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1e6),
                              sequence_parallel=sp)
        trajs = trajectories(n_traj=6, seed=9)[groups.dp_rank::groups.dp_size]
        mbs = []
        sums = update_once(policy, groups, trajs, ratio=0.5, pad_multiple=tp if sp else 1, microbatches_out=mbs)
        grads = dict(export_hf_tensors(policy.model, groups, source=lambda p: p.main_grad))
        params = dict(export_hf_tensors(policy.model, groups))
        out[(tp, sp)] = {"grads": grads, "params": params, "loss_sum": sums.get("loss_sum", 0.0),
                         "lengths": [mb.tokens.shape[1] for mb in mbs], "dp_rank": groups.dp_rank,
                         "mbs": [(mb.tokens, mb.labels, mb.response_mask, mb.advantages, mb.old_logprobs,
                                  mb.fork_mask) for mb in mbs]}
    return out


def _reference(ref, parts):
    ref.zero_grad()
    total, n_resp = 0.0, sum(int(p[2].sum()) for p in parts)
    for tokens, labels, resp, adv, old, fork in parts:
        lp = torch.log_softmax(ref(tokens).logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss, _ = dapo_policy_loss(lp, old.double(), adv.double(), fork & resp, normalizer=n_resp, **CLIP)
        loss.backward()
        total += float(loss.detach())
    return total, n_resp, {n: p.grad.clone() for n, p in ref.named_parameters()}


def test_sequence_parallel_equals_tp1_and_float64(tmp_path):
    from transformers import Qwen3ForCausalLM

    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=6, tie_word_embeddings=False))
    ranks = run_ranks(_worker, 2, args=(hf_dir,), timeout=400)
    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    for tp, sp in LAYOUTS:
        r0, r1 = ranks[0][(tp, sp)], ranks[1][(tp, sp)]
        where = f"tp={tp} sp={sp}"
        if sp:
            assert all(n % tp == 0 for n in r0["lengths"]), (where, r0["lengths"])
            assert any(n % tp for n in ranks[0][(2, False)]["lengths"]), "the data must need SP padding"
        parts = r0["mbs"] + (r1["mbs"] if tp == 1 else [])
        want_loss, n_resp, want = _reference(ref, parts)
        got_loss = (r0["loss_sum"] + (r1["loss_sum"] if tp == 1 else 0.0)) / n_resp
        assert abs(got_loss - want_loss) < 1e-5 * abs(want_loss), (where, got_loss, want_loss)
        norms = [n for n in want if "norm" in n]
        assert len(norms) == 2 * 4 + 1 and set(r0["grads"]) == set(want), where
        for name, g in r0["grads"].items():
            err = float((g.double() - want[name]).abs().max() / want[name].abs().max())
            assert err < 1e-5, f"{where}: grad {name} relative error {err:.2e}"
    # The Adam step itself: SP moves every weight as TP=2 without SP does. (Across TP sizes Adam's
    # g/sqrt(v) amplifies fp32 rounding of near-zero gradients; the gradients are compared above.)
    for name, p in ranks[0][(2, False)]["params"].items():
        torch.testing.assert_close(ranks[0][(2, True)]["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)

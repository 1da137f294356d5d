"""The LM-head weight gradient reaches megatron DDP's fp32 main_grad at fp32 precision.

    .venv/bin/python -m pytest tests/test_head_main_grad.py -q

A bf16 megafork Qwen3 (megatron DDP, fp32 main_grad) runs the trainer's update path (old pass,
top-50% selection, `run_schedule` over `pipeline.policy_forward_step`) on two gloo ranks, at
TP=1 (DP=2, overlap_grad_reduce) and TP=2, with tied and untied embeddings, over several micro-batches per rank
(main_grad must accumulate them). The fused head's inputs are recorded as the trainer passes
them; the reference is d/dW [Σ DAPO loss / response tokens] in float64 from those bf16 inputs.
The LM-head rows of main_grad must match it to ~fp32 precision, far below what bf16 rounding of
the same gradient (the old route through `param.grad`) loses. With tied embeddings the rows of
the input tokens also carry the embedding's own (bf16) gradient, which must not be lost.
"""
from __future__ import annotations

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

VOCAB, USED = 500, 120  # trajectories draw ids below USED: the rows above carry the head's gradient only


def _worker(rank, world, dirs):
    import megafork.pipeline as pipeline
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.testing.update_step import build_policy, trajectories
    from megafork.train.batch import pack_microbatches
    from megafork.train.config import ForkingConfig, ModelConfig, OptimConfig
    from megafork.train.update import old_pass, run_schedule, select

    calls, emb_grads = [], []
    real = pipeline.fused_head_policy_loss

    def recording(hidden, weight, labels, old, adv, mask, **kw):
        calls.append({"hidden": hidden.detach().clone(), "labels": labels.clone(), "old": old.clone(),
                      "adv": adv.clone(), "mask": mask.clone(), "response": kw["response_mask"].clone(),
                      "clip": (kw["clip_low"], kw["clip_high"], kw["clip_ratio_c"]), "is_weights": kw["is_weights"]})
        return real(hidden, weight, labels, old, adv, mask, **kw)

    def embedding_grad(module, args, output):  # the gradient arriving at the word embeddings' output
        ids = args[0].detach().clone()
        output.register_hook(lambda g: emb_grads.append((ids, g.detach().double().clone())))

    pipeline.fused_head_policy_loss = recording
    out = {}
    for tied, hf_dir in dirs.items():
        for tp in (1, 2):
            groups = init_distributed(ParallelConfig(tp=tp))
            # DP=2 also with overlap_grad_reduce: DDP's hook must see a gradient (the dummy) to launch the reduce.
            policy = build_policy(hf_dir, groups, ModelConfig(), OptimConfig(overlap_grad_reduce=tp == 1),
                                  dtype="bf16", optimizer=False)
            trajs = trajectories(n_traj=8, seed=5, vocab=USED)[groups.dp_rank::groups.dp_size]
            mbs = pack_microbatches(trajs, micro_batch_size=2, pad_id=0)
            old_pass(policy.chunks, mbs, groups, policy.vocab_size, temperature=1.0, chunk_size=None)
            select(mbs, ForkingConfig(ratio=0.5), [list(range(len(mbs)))], groups, seed=0)
            calls.clear()
            emb_grads.clear()
            hook = policy.model.embedding.word_embeddings.register_forward_hook(embedding_grad)
            for chunk in policy.chunks:
                chunk.zero_grad_buffer()
            run_schedule(policy.chunks, pipeline.policy_forward_step(pipeline.PolicyLossConfig(), groups.tp,
                                                                     policy.vocab_size),
                         mbs, forward_only=False, groups=groups)
            hook.remove()
            w = policy.model.output_weight()
            out[(tied, tp)] = {"weight": w.detach().clone(), "main_grad": w.main_grad.clone(),
                               "grad_dtype": str(w.main_grad.dtype), "param_dtype": str(w.dtype),
                               "calls": list(calls), "emb_grads": list(emb_grads), "tp_rank": groups.tp_rank,
                               "zero_out_wgrad": bool(getattr(w, "zero_out_wgrad", False))}
    return out


def _reference_head_grad(w_full: torch.Tensor, calls: list[dict]) -> torch.Tensor:
    """d/dW [Σ_calls DAPO loss / Σ response tokens] in float64 over the padded [V_pad, H] weight."""
    wr = w_full.double().requires_grad_()
    n_resp = sum(int(c["response"].sum()) for c in calls)
    total = 0.0
    for c in calls:
        logp = torch.log_softmax(c["hidden"].double() @ wr[:VOCAB].T, -1)
        lp = logp.gather(-1, c["labels"][:, None]).squeeze(-1)
        lo, hi, cc = c["clip"]
        w = None if c["is_weights"] is None else c["is_weights"].double()
        loss, _ = dapo_policy_loss(lp, c["old"].double(), c["adv"].double(), c["mask"], lo, hi, cc,
                                   normalizer=n_resp, is_weights=w)
        total = total + loss
    (g,) = torch.autograd.grad(total, wr)
    return g


def _embedding_grad(emb_grads: list, v_pad: int, hidden: int) -> torch.Tensor:
    g = torch.zeros(v_pad, hidden, dtype=torch.float64)
    for ids, grad in emb_grads:
        g.index_add_(0, ids.reshape(-1), grad.reshape(-1, hidden))
    return g


def test_lm_head_main_grad_is_fp32_exact(tmp_path):
    dirs = {tied: str(make_tiny_qwen3(tmp_path / f"hf_{tied}", seed=4, vocab_size=VOCAB, tie_word_embeddings=tied))
            for tied in (False, True)}
    ranks = run_ranks(_worker, 2, args=(dirs,), timeout=600)
    for tied in (False, True):
        for tp in (1, 2):
            where = f"tied={tied} tp={tp}"
            r = [ranks[i][(tied, tp)] for i in range(2)]
            assert r[0]["param_dtype"] == "torch.bfloat16" and r[0]["grad_dtype"] == "torch.float32", where
            assert r[0]["zero_out_wgrad"] == tied, f"{where}: megatron marks a tied weight at PP=1 zero_out_wgrad"
            # TP=1 is DP=2: each rank trains on its half of the micro-batches; TP=2 ranks see the same ones.
            calls = r[0]["calls"] + (r[1]["calls"] if tp == 1 else [])
            assert all(len(x["calls"]) >= 2 for x in r), f"{where}: expected >= 2 micro-batches per rank"
            w_full = torch.cat([x["weight"] for x in r]) if tp == 2 else r[0]["weight"]
            v_pad, hidden = w_full.shape
            ref = _reference_head_grad(w_full, calls)
            if tp == 1:
                assert torch.equal(r[0]["main_grad"], r[1]["main_grad"]), f"{where}: DP ranks disagree"
            got = torch.cat([x["main_grad"] for x in r]) if tp == 2 else r[0]["main_grad"]
            head_rows = torch.arange(v_pad) >= USED  # no input token: the head's gradient alone
            assert not got[VOCAB:].any(), f"{where}: padding rows of the vocab got a gradient"
            g, want = got[head_rows].double(), ref[head_rows]
            err = float((g - want).norm() / want.norm())
            bf16_err = float((want.to(torch.bfloat16).double() - want).norm() / want.norm())
            assert err < 2e-5 and err < 1e-2 * bf16_err, f"{where}: relative error {err:.2e} (bf16: {bf16_err:.2e})"
            print(f"{where}: main_grad relative error {err:.2e}, bf16 rounding of the same gradient {bf16_err:.2e}")
            if tied:  # the input tokens' rows: head + embedding gradient, the latter computed in bf16
                # captured before finalize_model_grads divides by the step's response tokens
                n_resp = sum(int(c["response"].sum()) for c in calls)
                emb = _embedding_grad(r[0]["emb_grads"] + (r[1]["emb_grads"] if tp == 1 else []), v_pad, hidden) / n_resp
                rows = ~head_rows
                assert emb[rows].abs().max() > 0.1 * ref[rows].abs().max(), f"{where}: the test needs a visible embedding gradient"
                miss = float((got[rows].double() - ref[rows] - emb[rows]).abs().max() / emb[rows].abs().max())
                assert miss < 2e-2, f"{where}: embedding rows off by {miss:.2e} of the embedding gradient"


def test_plain_autograd_keeps_the_weight_dtype_gradient():
    """Without megatron DDP (no main_grad) the gradient arrives in param.grad, in the weight's dtype."""
    from megafork.ops import fused_head_policy_loss

    g = torch.Generator().manual_seed(2)
    t, h_dim, v = 96, 16, 70
    hidden = torch.randn(t, h_dim, generator=g).bfloat16().requires_grad_()
    weight = torch.nn.Parameter((0.3 * torch.randn(v, h_dim, generator=g)).bfloat16())
    labels = torch.randint(0, v, (t,), generator=g)
    old, adv = torch.randn(t, generator=g) * 0.3 - 4.0, torch.randn(t, generator=g)
    mask = torch.rand(t, generator=g) < 0.4
    wr = weight.detach().double().requires_grad_()
    lp = torch.log_softmax(hidden.detach().double() @ wr.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    (ref,) = torch.autograd.grad(dapo_policy_loss(lp, old.double(), adv.double(), mask, normalizer=t)[0], wr)
    for _ in range(2):  # accumulates in .grad, as autograd does
        loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, mask, normalizer=t, chunk_size=32)
        loss.backward()
    assert weight.grad.dtype == torch.bfloat16 and not hasattr(weight, "grad_added_to_main_grad")
    # One bf16 rounding of the exact gradient per call (then bf16 addition): as close as bf16 allows.
    want = (2 * ref).to(torch.bfloat16).double()
    torch.testing.assert_close(weight.grad.double(), want, rtol=2**-7, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("zero_out", [False, True])
def test_megatron_contract_without_ddp(zero_out):
    """main_grad accumulates scale * dW in fp32; autograd gets a dummy (zeros for zero_out_wgrad)."""
    from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss

    g = torch.Generator().manual_seed(3)
    t, h_dim, v = 40, 8, 30
    hidden = torch.randn(t, h_dim, generator=g).bfloat16()
    weight = torch.nn.Parameter((0.3 * torch.randn(v, h_dim, generator=g)).bfloat16())
    weight.main_grad = torch.zeros(v, h_dim)
    weight.grad_added_to_main_grad = False
    if zero_out:
        weight.zero_out_wgrad = True
    labels = torch.randint(0, v, (t,), generator=g)
    old, adv = torch.randn(t, generator=g) - 4.0, torch.randn(t, generator=g)
    mask = torch.rand(t, generator=g) < 0.5
    wr = weight.detach().double().requires_grad_()
    lp_ref = torch.log_softmax(hidden.double() @ wr.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    loss_ref = 0.5 * dapo_policy_loss(lp_ref, old.double(), adv.double(), mask, normalizer=t)[0] + lp_ref.sum()
    (ref,) = torch.autograd.grad(loss_ref, wr)
    loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, mask, normalizer=t)
    (0.5 * loss).backward()  # the grad_output scale is applied exactly
    assert weight.grad_added_to_main_grad is True and weight.grad.shape == weight.shape
    weight.grad = None  # megatron DDP's hook does this
    lp, _ = fused_head_logprobs_entropy(hidden, weight, labels)
    lp.sum().backward()
    assert weight.grad.dtype == torch.bfloat16 and (not zero_out or not weight.grad.any())
    err = float((weight.main_grad.double() - ref).norm() / ref.norm())
    assert err < 1e-5, f"main_grad relative error {err:.2e}"
    weight.main_grad = torch.zeros(v + 1, h_dim)
    loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, mask, normalizer=t)
    with pytest.raises(ValueError, match=r"weight_shard.main_grad: expected shape \(30, 8\).*found \(31, 8\)"):
        loss.backward()

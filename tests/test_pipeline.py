"""megafork.pipeline: the drop-in forward_step / loss_func pair for existing Megatron pipelines.

    .venv/bin/python -m pytest tests/test_pipeline.py -q

One process: `policy_loss_func` against float64 autograd on `dapo_policy_loss(log_softmax(logits))`
for mode "all" (plain DAPO), a top-20% mask (only selected rows get gradient, and the mask reaches
the loss), both normalisers, in-pass selection (`local_ratio`), and its errors.

Two gloo ranks: megafork's Qwen3 through megatron's `get_forward_backward_func` with DDP and
`calculate_per_token_loss=True` (old pass with `logprob_forward_step`, selection over the DP
group, update with `policy_forward_step`). The gradients left in DDP's `main_grad` must equal
d/dθ [Σ token losses of every micro-batch and rank / global count] of a float64 transformers
reference, for 1 and 3 micro-batches per rank at DP=2 and for 2 micro-batches at TP=2.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss, dapo_token_loss
from megafork.ops import fused_head_logprobs_entropy
from megafork.pipeline import PolicyLossConfig, policy_loss_func
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.train.batch import MicroBatch, Trajectory, pack_microbatches

REPO = Path(__file__).resolve().parents[1]
V_PAD, V, H, B, S = 40, 37, 16, 3, 9  # padded rows 37..39 must never count
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0)


class _Head:
    """What `policy_loss_func` needs from the model: its LM-head weight shard (`output_weight()`)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def output_weight(self) -> torch.Tensor:
        return self.weight


def _case(seed: int = 0, temperature: float = 1.0):
    """hidden [s, b, h], W [V_pad, h], and a micro-batch whose old log-probs straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g)
    weight = 0.5 * torch.randn(V_PAD, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    response = torch.zeros(B, S, dtype=torch.bool)
    for r, (start, n) in enumerate([(2, 6), (4, 5), (1, 8)]):
        response[r, start:start + n] = True
    adv = torch.tensor([1.0, -0.7, 0.4]).unsqueeze(1).expand(B, S) * response
    lp, _ = _reference_logprobs(hidden, weight, labels, temperature)
    old = (lp.detach() + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)).float() * response
    batch = MicroBatch(tokens=labels.clone(), position_ids=torch.arange(S).expand(B, S), labels=labels,
                       response_mask=response, advantages=adv.contiguous(), rollout_logprobs=old.clone(),
                       old_logprobs=old)
    return hidden, weight, batch


def _reference_logprobs(hidden, weight, labels, temperature):
    """float64 log p(label) and entropy, [b, s], differentiable w.r.t. the float64 leaves it makes."""
    h = hidden.double().transpose(0, 1).requires_grad_()
    w = weight.double().requires_grad_()
    logp = torch.log_softmax(h @ w[:V].T / temperature, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    lp.leaves = (h, w)
    return lp, ent


def _reference_step(hidden, weight, batch, mask, normalizer, temperature=1.0):
    """float64 autograd of the DAPO loss over `mask`: (loss, d/dhidden [s, b, h], d/dW)."""
    lp, _ = _reference_logprobs(hidden, weight, batch.labels, temperature)
    loss, _ = dapo_policy_loss(lp, batch.old_logprobs.double(), batch.advantages.double(), mask,
                               normalizer=normalizer, **CLIP)
    loss.backward()
    h, w = lp.leaves
    return loss.detach(), h.grad.transpose(0, 1), w.grad


def _megafork_step(cfg, hidden, weight, batch):
    """policy_loss_func as Megatron calls it; gradients divided by the returned count, as megatron does."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, count, metrics = policy_loss_func(cfg, None, V, batch, _Head(w), h)
    loss.backward()
    n = float(count)
    return loss.detach().double() / n, h.grad.double() / n, w.grad.double() / n, count, metrics


def _close(got, want, tol=1e-5):
    scale = want.abs().max().clamp_min(1e-12)
    return float((got - want).abs().max() / scale) < tol


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mode_all_with_all_tokens_is_plain_dapo(temperature):
    hidden, weight, batch = _case(temperature=temperature)
    batch.fork_mask = batch.response_mask.clone()  # mode "all"
    cfg = PolicyLossConfig(normalizer="all_tokens", temperature=temperature, **CLIP)
    loss, dh, dw, count, m = _megafork_step(cfg, hidden, weight, batch)
    n_resp = int(batch.response_mask.sum())
    want_loss, want_dh, want_dw = _reference_step(hidden, weight, batch, batch.response_mask, n_resp, temperature)
    assert int(count) == n_resp and float(m["normalizer"]) == n_resp and float(m["selected"]) == n_resp
    assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert _close(dh, want_dh) and _close(dw, want_dw)
    assert float(dw[V:].abs().max()) == 0.0, "vocabulary padding rows got gradient"
    # The case exercises the clip: some ratios leave [0.8, 1.28] (their tokens get no gradient).
    assert float(m["clipfrac_low_sum"] + m["clipfrac_high_sum"]) > 0


def _top_mask(hidden, weight, batch, ratio=0.2):
    _, ent = _reference_logprobs(hidden, weight, batch.labels, 1.0)
    ent = ent.detach().float()
    resp = batch.response_mask
    k = math.ceil(ratio * int(resp.sum()))
    tau = torch.topk(ent[resp], k).values[-1]
    return resp & (ent >= tau)


@pytest.mark.parametrize("normalizer", ["all_tokens", "selected_tokens"])
def test_only_selected_tokens_get_gradient(normalizer):
    hidden, weight, batch = _case(seed=1)
    batch.fork_mask = _top_mask(hidden, weight, batch)
    cfg = PolicyLossConfig(normalizer=normalizer, **CLIP)
    loss, dh, dw, count, m = _megafork_step(cfg, hidden, weight, batch)
    n = int(batch.response_mask.sum()) if normalizer == "all_tokens" else int(batch.fork_mask.sum())
    assert int(count) == n and float(m["selected"]) == int(batch.fork_mask.sum())
    want_loss, want_dh, want_dw = _reference_step(hidden, weight, batch, batch.fork_mask, n)
    assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert _close(dh, want_dh) and _close(dw, want_dw)
    # d loss / d hidden is exactly zero at every unselected position, non-zero at selected ones
    # whose ratio is inside the clip range.
    row_norm = dh.norm(dim=-1).transpose(0, 1)  # [b, s]
    assert float(row_norm[~batch.fork_mask].abs().max()) == 0.0
    assert int((row_norm[batch.fork_mask] > 0).sum()) >= int(batch.fork_mask.sum()) - 2


def test_the_mask_reaches_the_loss():
    hidden, weight, batch = _case(seed=2)
    batch.fork_mask = _top_mask(hidden, weight, batch)
    cfg = PolicyLossConfig(**CLIP)
    _, dh, dw, _, _ = _megafork_step(cfg, hidden, weight, batch)
    unselected = (batch.response_mask & ~batch.fork_mask).nonzero()[0]
    selected = batch.fork_mask.nonzero()
    # A selected token whose ratio is inside the clip range (so its gradient is live).
    ratio = torch.exp(_reference_logprobs(hidden, weight, batch.labels, 1.0)[0].detach().float()
                      - batch.old_logprobs)
    live = [tuple(i.tolist()) for i in selected if 0.8 < float(ratio[tuple(i)]) < 1.28]
    assert live, "the case needs a selected token inside the clip range"

    def perturbed(pos):
        b = MicroBatch(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.__dict__.items()})
        b.old_logprobs[pos] -= 0.05
        b.advantages[pos] += 0.5
        return _megafork_step(cfg, hidden, weight, b)

    _, dh_u, dw_u, _, _ = perturbed(tuple(unselected.tolist()))
    assert torch.equal(dh_u, dh) and torch.equal(dw_u, dw)
    _, dh_s, dw_s, _, _ = perturbed(live[0])
    assert not torch.allclose(dh_s, dh) and not torch.allclose(dw_s, dw)


@pytest.mark.parametrize("mode", ["top", "bottom"])
def test_local_scope_selects_exactly_k_per_microbatch_in_the_training_pass(mode):
    hidden, weight, batch = _case(seed=3)
    ratio = 0.3
    # The batch's fork_mask is not read in local mode: give it a mask that would be wrong.
    batch.fork_mask = batch.response_mask.clone()
    cfg = PolicyLossConfig(local_ratio=ratio, local_mode=mode, **CLIP)
    loss, dh, dw, count, m = _megafork_step(cfg, hidden, weight, batch)
    # The released code: exactly k = ceil(ratio * N_mb) tokens by torch.topk on the entropy of
    # this (training) forward pass.
    with torch.no_grad():
        _, ent = fused_head_logprobs_entropy(hidden.transpose(0, 1).reshape(-1, H), weight,
                                             batch.labels.reshape(-1), vocab_size=V)
    resp = batch.response_mask.reshape(-1)
    idx = resp.nonzero().reshape(-1)
    k = math.ceil(ratio * idx.numel())
    chosen = idx[torch.topk(ent[idx], k, largest=mode == "top").indices]
    want_mask = torch.zeros_like(resp)
    want_mask[chosen] = True
    want_mask = want_mask.view(B, S)
    assert float(m["selected"]) == k and int(count) == int(resp.sum())
    want_loss, want_dh, want_dw = _reference_step(hidden, weight, batch, want_mask, int(resp.sum()))
    assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert _close(dh, want_dh) and _close(dw, want_dw)


def test_missing_fork_mask_is_an_error():
    hidden, weight, batch = _case()
    with pytest.raises(ValueError, match="fork_mask"):
        policy_loss_func(PolicyLossConfig(), None, V, batch, _Head(weight), hidden)


@pytest.mark.parametrize("kwargs, match", [
    (dict(normalizer="token_mean"), "algo.normalizer"),
    (dict(local_ratio=0.0), "forking.ratio"),
    (dict(local_ratio=1.5), "forking.ratio"),
    (dict(local_mode="random"), "forking.mode"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(clip_high=float("nan")), "clip_high"),
    (dict(clip_ratio_c=0.5), "clip_ratio_c"),
])
def test_policy_loss_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_model_without_output_weight_is_an_error():
    from megafork.pipeline import policy_forward_step

    batch = _case()[2]
    step = policy_forward_step(PolicyLossConfig(), None, V)
    with pytest.raises(TypeError, match="output_weight"):
        step(iter([batch]), torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# The Megatron contract on two ranks, against a float64 transformers reference.

def _trajectories() -> list[Trajectory]:
    """Six responses of different lengths (three per DP rank), advantages of both signs."""
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(6):
        p, n = 3 + i % 3, 2 + (5 * i) % 6
        ids = torch.randint(3, 98, (p + n,), generator=g).tolist()
        out.append(Trajectory(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[0.0] * n, reward=0.0,
                              accuracy=0.0, advantage=[1.0, -1.0, 0.5, -0.5, 1.5, -1.5][i], group=i // 2))
    return out


def _contract_worker(rank, world, hf_dir):
    from functools import partial

    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.forking import select_forking_tokens
    from megafork.models.qwen3 import (
        Qwen3BuildOptions,
        build_qwen3,
        export_hf_tensors,
        load_hf_weights,
        read_hf_config,
    )
    from megafork.pipeline import logprob_forward_step, policy_forward_step
    from megafork.train.optim import enable_per_token_loss, wrap_ddp

    out = []
    for tp, splits in ((1, (3, 1)), (2, (3,))):
        groups = init_distributed(ParallelConfig(tp=tp))
        hf = read_hf_config(hf_dir)
        model = build_qwen3(hf, Qwen3BuildOptions(dtype="fp32"), groups)
        load_hf_weights(model, hf_dir, groups)
        enable_per_token_loss(model)
        ddp = wrap_ddp(model, groups)
        model.config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=groups.pg_collection)
        fb = get_forward_backward_func()
        trajs = _trajectories()
        mine = trajs[3 * groups.dp_rank:3 * groups.dp_rank + 3] if groups.dp_size == 2 else trajs
        for mbs_rows in splits:
            for mode in ("all", "top"):
                mbs = pack_microbatches(mine, mbs_rows, pad_id=0)
                kw = dict(data_iterator=iter(mbs), model=[ddp], num_microbatches=len(mbs),
                          seq_length=max(mb.tokens.shape[1] for mb in mbs),
                          micro_batch_size=mbs[0].tokens.shape[0])
                with torch.no_grad():
                    res = fb(forward_step_func=logprob_forward_step(groups.tp, hf.vocab_size), forward_only=True, **kw)
                g = torch.Generator().manual_seed(5 + rank % groups.dp_size)
                for mb, r in zip(mbs, res):
                    # Old log-probs off the current policy, so that the clip matters.
                    mb.old_logprobs = r["logprobs"] + 0.3 * torch.randn(r["logprobs"].shape, generator=g)
                    mb.entropy = r["entropy"]
                ent = torch.cat([mb.entropy.reshape(-1) for mb in mbs])
                resp = torch.cat([mb.response_mask.reshape(-1) for mb in mbs])
                sel = select_forking_tokens(ent, resp, 0.2, mode=mode, group=groups.dp_cp)
                off = 0
                for mb in mbs:
                    mb.fork_mask = sel[off:off + mb.entropy.numel()].view_as(mb.entropy)
                    off += mb.entropy.numel()
                ddp.zero_grad_buffer()
                kw["data_iterator"] = iter(mbs)
                losses = fb(forward_step_func=policy_forward_step(PolicyLossConfig(), groups.tp, hf.vocab_size),
                            forward_only=False, **kw)
                grads = dict(export_hf_tensors(model, groups, source=lambda p: p.main_grad))
                out.append({"tp": tp, "split": mbs_rows, "mode": mode, "dp_rank": groups.dp_rank,
                            "grads": grads if rank == 0 else None,
                            "loss_sum": sum(float(x["loss_sum"]) for x in losses),
                            "mbs": [(mb.tokens, mb.labels, mb.response_mask, mb.advantages, mb.old_logprobs,
                                     mb.fork_mask) for mb in mbs]})
    return out


def _reference_grads(ref, parts, mode):
    """float64 d/dθ of Σ DAPO token loss over all parts / their response-token count.

    Also returns Σ|token loss| / count: the scale of the terms the fp32 loss sums, whose signs
    cancel (advantages of both signs), so it, not the small total, bounds the fp32 rounding.
    """
    ref.zero_grad()
    total, scale, n_resp = 0.0, 0.0, sum(int(p[2].sum()) for p in parts)
    for tokens, labels, resp, adv, old, fork in parts:
        logits = ref(tokens).logits
        lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        mask = resp if mode == "all" else fork
        loss, _ = dapo_policy_loss(lp, old.double(), adv.double(), mask, normalizer=n_resp, **CLIP)
        loss.backward()
        total += float(loss.detach())
        token_loss, _ = dapo_token_loss(lp.detach(), old.double(), adv.double(), **CLIP)
        scale += float((token_loss.abs() * mask).sum()) / n_resp
    return total, scale, {n: p.grad.clone() for n, p in ref.named_parameters()}, n_resp


def test_megatron_contract_dp2_tp2_and_microbatch_splits_match_float64(tmp_path):
    from transformers import Qwen3ForCausalLM

    hf_dir = str(make_tiny_qwen3(tmp_path / "hf", seed=4))
    ranks = run_ranks(_contract_worker, 2, args=(hf_dir,), timeout=300)
    ref = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    seen = set()
    for i, r0 in enumerate(ranks[0]):
        r1 = ranks[1][i]
        # The micro-batches of both DP ranks (TP ranks hold the same ones).
        parts = r0["mbs"] + (r1["mbs"] if r0["tp"] == 1 else [])
        want_loss, scale, want, n_resp = _reference_grads(ref, parts, r0["mode"])
        got_loss = (r0["loss_sum"] + (r1["loss_sum"] if r0["tp"] == 1 else 0.0)) / n_resp
        where = f"tp={r0['tp']} rows/micro-batch={r0['split']} mode={r0['mode']}"
        assert abs(got_loss - want_loss) < 1e-5 * scale, (where, got_loss, want_loss, scale)
        assert set(r0["grads"]) == set(want) - {"lm_head.weight"}, where  # tied embeddings
        for name, g in r0["grads"].items():
            err = float((g.double() - want[name]).abs().max() / want[name].abs().max())
            assert err < 1e-5, f"{where}: grad {name} relative error {err:.2e}"
        sel = sum(int(p[5].sum()) for p in parts)
        if r0["mode"] == "top":
            assert math.ceil(0.2 * n_resp) <= sel < 0.3 * n_resp, (where, sel, n_resp)
        else:
            assert sel == n_resp, where
        seen.add((r0["tp"], r0["split"]))
    assert seen == {(1, 3), (1, 1), (2, 3)}


def _run_example(*flags: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "examples" / "megatron_pipeline.py"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [line for line in proc.stdout.splitlines() if "loss=" in line]


def test_example_megatron_pipeline_runs_on_two_ranks_padded_and_packed():
    padded, packed = _run_example(), _run_example("--packed")

    def parse(lines):
        return [{k: v for k, v in (kv.split("=") for kv in line.split(": ")[1].split() if "=" in kv)}
                for line in lines]

    a, b = parse(padded), parse(packed)
    assert len(a) == len(b) == 3, padded + packed
    for ra, rb in zip(a, b, strict=True):
        # Same rows, same weights at step 0; packed rows change no number (to fp32 rounding).
        assert math.isfinite(float(ra["loss"])) and ra["selected"] == rb["selected"], (ra, rb)
        assert abs(float(ra["loss"]) - float(rb["loss"])) <= 1e-4 * max(1.0, abs(float(ra["loss"]))), (ra, rb)
        assert abs(float(ra["grad_norm"]) - float(rb["grad_norm"])) <= 1e-3 * float(ra["grad_norm"]), (ra, rb)

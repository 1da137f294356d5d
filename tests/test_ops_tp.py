"""Every op of megafork.ops against an unsharded float64 reference at TP=1, 2 and 4 (gloo).

One rank function runs all checks, so each world size costs a single spawn: the vocab-parallel
op, the fused head and the fused policy head, in float64 (tight: the algorithm is exact) and
fp32 (the production dtype), forward values and every gradient (logits shard, hidden, weight
shard), with a padded vocabulary (including a rank that holds only padding), extreme logits
(+-1e4), temperature != 1, chunk sizes that do not divide T, and random / empty / full masks.
The 4-rank run also drives the fused policy head through megatron-core's DDP at TP=2 x DP=2 and
checks that the weight gradient lands in `param.main_grad`.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megafork.algo.loss import dapo_policy_loss
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss, vocab_parallel_logprobs_entropy
from megafork.testing.multirank import run_ranks

T, H, V_LOCAL, CHUNK = 11, 8, 5, 4
TEMPERATURE = 0.7
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def reference(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, temperature: float):
    """Unsharded float64 log p(label) and entropy from full (padded) logits."""
    logp = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _close(actual, expected, dtype, what, rank):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype],
                               msg=lambda m: f"rank {rank}, {what}: {m}")


def _data(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    v_pad = V_LOCAL * world
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(v_pad, H, generator=g, dtype=torch.float64)
    # Padding inside the last shard, and (TP >= 2) a last rank that holds nothing but padding.
    vocab_sizes = [v_pad - 2] + ([v_pad - V_LOCAL - 1] if world > 1 else [v_pad])
    return g, h, w, vocab_sizes


def check_vocab_parallel(rank, world, group, dtype, n_checks):
    g, h, w, vocab_sizes = _data(world, seed=1)
    logits = (h @ w.T).to(dtype)
    logits[0, :] = -1e4  # extreme rows: a flat row at -1e4 and a near one-hot row
    logits[1, :] = torch.where(torch.arange(logits.shape[1]) % 3 == 0, 1e4, -1e4)
    for vocab_size in vocab_sizes:
        labels = torch.randint(0, vocab_size, (T,), generator=g)
        a, b = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
        a[::3] = 0.0
        full = logits.double().requires_grad_()
        lp_ref, ent_ref = reference(full, labels, vocab_size, TEMPERATURE)
        (ga_ref,) = torch.autograd.grad((a * lp_ref + b * ent_ref).sum(), full, retain_graph=True)
        (gl_ref,) = torch.autograd.grad((a * lp_ref).sum(), full)
        cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
        shard = logits[:, cols].clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs_entropy(shard, labels, group, TEMPERATURE, vocab_size)
        assert lp.dtype == ent.dtype == torch.promote_types(dtype, torch.float32)
        _close(lp, lp_ref, dtype, f"vocab_parallel logprob V={vocab_size}", rank)
        _close(ent, ent_ref, dtype, f"vocab_parallel entropy V={vocab_size}", rank)
        (grad,) = torch.autograd.grad((a * lp + b * ent).sum(), shard)
        _close(grad, ga_ref[:, cols], dtype, f"vocab_parallel d(logprob+entropy)/dlogits V={vocab_size}", rank)
        lp, _ = vocab_parallel_logprobs_entropy(shard, labels, group, TEMPERATURE, vocab_size)
        (grad,) = torch.autograd.grad((a * lp).sum(), shard)  # entropy unused: its gradient is None
        _close(grad, gl_ref[:, cols], dtype, f"vocab_parallel dlogprob/dlogits V={vocab_size}", rank)
        n_checks += 5
    return n_checks


def _head_inputs(world, rank, dtype, seed, extreme):
    g, h, w, vocab_sizes = _data(world, seed)
    if extreme:  # logits of order 1e4 on two rows (exact only in float64)
        h[0] *= 3e3
        h[1] *= -3e3
    rows = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    return g, h, w, vocab_sizes, h.to(dtype).requires_grad_(), w[rows].to(dtype).requires_grad_(), rows


def check_fused_head(rank, world, group, dtype, n_checks):
    g, h, w, vocab_sizes, hs, ws, rows = _head_inputs(world, rank, dtype, 2, dtype == torch.float64)
    for vocab_size in vocab_sizes:
        labels = torch.randint(0, vocab_size, (T,), generator=g)
        a, b = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
        a[1::3] = 0.0
        b[::2] = 0.0  # rows 0, 6 have no gradient at all: the backward must skip them exactly
        hr = hs.detach().double().requires_grad_()
        wr = w.clone().requires_grad_() if dtype == torch.float64 else w.to(dtype).double().requires_grad_()
        lp_ref, ent_ref = reference(hr @ wr.T, labels, vocab_size, TEMPERATURE)
        gh_ref, gw_ref = torch.autograd.grad((a * lp_ref + b * ent_ref).sum(), (hr, wr))
        lp, ent = fused_head_logprobs_entropy(hs, ws, labels, group, TEMPERATURE, vocab_size, chunk_size=CHUNK)
        _close(lp, lp_ref, dtype, f"fused_head logprob V={vocab_size}", rank)
        _close(ent, ent_ref, dtype, f"fused_head entropy V={vocab_size}", rank)
        gh, gw = torch.autograd.grad((a * lp + b * ent).sum(), (hs, ws))
        _close(gh, gh_ref, dtype, f"fused_head hidden grad (summed over TP) V={vocab_size}", rank)
        _close(gw, gw_ref[rows], dtype, f"fused_head weight-shard grad V={vocab_size}", rank)
        n_checks += 4
    return n_checks


def check_fused_policy(rank, world, group, dtype, n_checks):
    g, h, w, vocab_sizes, hs, ws, rows = _head_inputs(world, rank, dtype, 3, dtype == torch.float64)
    vocab_size = vocab_sizes[-1]
    labels = torch.randint(0, vocab_size, (T,), generator=g)
    hr = hs.detach().double().requires_grad_()
    wr = (w if dtype == torch.float64 else w.to(dtype).double()).clone().requires_grad_()
    lp_ref, ent_ref = reference(hr @ wr.T, labels, vocab_size, TEMPERATURE)
    old = lp_ref.detach() + 0.4 * torch.randn(T, generator=g, dtype=torch.float64)  # some ratios clip
    adv = torch.randn(T, generator=g, dtype=torch.float64)
    masks = {"random": torch.rand(T, generator=g) < 0.4, "empty": torch.zeros(T, dtype=torch.bool),
             "all": torch.ones(T, dtype=torch.bool)}
    for name, mask in masks.items():
        kw = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, normalizer=2 * T)
        loss_ref, _ = dapo_policy_loss(lp_ref, old, adv, mask, **kw)
        gh_ref, gw_ref = torch.autograd.grad(loss_ref, (hr, wr), retain_graph=True)
        loss, metrics = fused_head_policy_loss(hs, ws, labels, old.to(dtype), adv.to(dtype), mask, tp_group=group,
                                               temperature=TEMPERATURE, vocab_size=vocab_size, chunk_size=CHUNK,
                                               **kw)
        _close(loss, loss_ref, dtype, f"fused_policy loss mask={name}", rank)
        _close(metrics["logprobs"], lp_ref, dtype, f"fused_policy logprobs mask={name}", rank)
        _close(metrics["entropy"], ent_ref, dtype, f"fused_policy entropy mask={name}", rank)
        gh, gw = torch.autograd.grad(loss, (hs, ws), allow_unused=True)
        _close(gh, gh_ref, dtype, f"fused_policy hidden grad mask={name}", rank)
        _close(gw, gw_ref[rows], dtype, f"fused_policy weight-shard grad mask={name}", rank)
        n_checks += 5
    return n_checks


def check_all(rank: int, world: int, group) -> int:
    n = 0
    for dtype in (torch.float64, torch.float32):
        n = check_vocab_parallel(rank, world, group, dtype, n)
        n = check_fused_head(rank, world, group, dtype, n)
        n = check_fused_policy(rank, world, group, dtype, n)
    return n


def _rank_tp2(rank, world):
    return check_all(rank, world, dist.group.WORLD)


def _rank_tp4_and_ddp(rank, world):
    from megafork.distributed import ParallelConfig, init_distributed

    groups = init_distributed(ParallelConfig(tp=2))  # also starts the default group (TP=4 below)
    n = check_all(rank, world, dist.group.WORLD)
    return n, check_megatron_ddp(groups)


def check_megatron_ddp(groups) -> float:
    """TP=2 x DP=2: the fused head's weight gradient reaches megatron DDP's main_grad."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    tp, dp = groups.tp_size, groups.dp_size
    vocab, tokens = 2 * V_LOCAL * tp - 3, 2 * T
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=tp, tensor_model_parallel_size=tp,
                               calculate_per_token_loss=True, use_cpu_initialization=True)
    module = torch.nn.Module()
    module.output_layer = ColumnParallelLinear(H, 2 * V_LOCAL * tp, config=config, init_method=torch.nn.init.zeros_,
                                               bias=False, gather_output=False, tp_group=groups.tp)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), module, pg_collection=groups.pg_collection)
    weight = module.output_layer.weight
    g = torch.Generator().manual_seed(5)
    w_full = torch.randn(2 * V_LOCAL * tp, H, generator=g)
    h_full = torch.randn(tokens, H, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    adv, noise = torch.randn(tokens, generator=g), 0.3 * torch.randn(tokens, generator=g)
    mask = torch.rand(tokens, generator=g) < 0.5
    rows = slice(groups.tp_rank * 2 * V_LOCAL, (groups.tp_rank + 1) * 2 * V_LOCAL)
    with torch.no_grad():
        weight.copy_(w_full[rows])

    wr = w_full.double().requires_grad_()
    lp_ref, _ = reference(h_full.double() @ wr.T, labels, vocab, 1.0)
    old = (lp_ref.detach() + noise.double()).float()
    loss_ref, _ = dapo_policy_loss(lp_ref, old.double(), adv.double(), mask, normalizer=int(mask.sum()))
    (gw_ref,) = torch.autograd.grad(loss_ref, wr)

    # Each DP rank takes its half of the tokens; the global normaliser makes the halves add up.
    mine = slice(groups.dp_rank * tokens // dp, (groups.dp_rank + 1) * tokens // dp)
    ddp.zero_grad_buffer()
    loss, _ = fused_head_policy_loss(h_full[mine], weight, labels[mine], old[mine], adv[mine], mask[mine],
                                     tp_group=groups.tp, vocab_size=vocab, normalizer=int(mask.sum()))
    loss.backward()
    ddp.finish_grad_sync()
    assert weight.grad is None, "megatron DDP's hook should have moved param.grad into main_grad"
    _close(weight.main_grad, gw_ref[rows], torch.float32, "megatron DDP main_grad", groups.rank)
    return float(weight.main_grad.abs().sum())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ops_against_float64_reference(world):
    if world == 1:
        n = check_all(0, 1, None)
    elif world == 2:
        n = run_ranks(_rank_tp2, 2, timeout=240)[0]
    else:
        out = run_ranks(_rank_tp4_and_ddp, 4, timeout=300, init_process_group=False)
        n = out[0][0]
        assert all(o[1] > 0 for o in out), f"empty main_grad on some rank: {[o[1] for o in out]}"
    # 2 dtypes x (vocab_parallel 2x5 + fused_head 2x4 + fused_policy 3x5) checks, all run.
    assert n == 2 * (10 + 8 + 15)

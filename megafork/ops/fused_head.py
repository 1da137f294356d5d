"""Fused LM head: log-probs and entropy straight from hidden states, one logits chunk at a time.

`fused_head_logprobs_entropy(hidden, weight_shard, labels)` equals
`vocab_parallel_logprobs_entropy(hidden @ weight_shard.T, labels)` but never materialises the
[T, V_local] logits: rows are processed in chunks of `chunk_size`, and only per-row statistics
([T] vectors) are kept for the backward, which recomputes each chunk's logits. The backward
recomputes and differentiates only the rows whose upstream gradient is non-zero, so a loss that
masks most tokens (forking tokens) pays for the selected rows only.

The gradient returned for `hidden` is summed over the TP group inside the backward (one
all-reduce of [T, H]), which is what megatron's ColumnParallelLinear returns for its input.
Do not also route `hidden` through `copy_to_tensor_model_parallel_region`. The weight gradient
is accumulated in fp32 and, under megatron DDP, added straight into the parameter's fp32
`main_grad` (`megafork.ops.weight_grad`); the products and their precision for a bf16 weight
are in `megafork.ops.head_gemm`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.ops.head_gemm import HeadGemms
from megafork.ops.vocab_stats import (
    VocabShard,
    Workspace,
    all_reduce,
    any_nonzero,
    check_chunk_size,
    check_labels,
    check_temperature,
    chunk_stats,
    compute_dtype,
    default_chunk,
    logits_grad,
    make_shard,
    rows_by_chunk,
)
from megafork.ops.weight_grad import deliver_weight_grad


def check_head_inputs(hidden, weight_shard, labels, tp_group, vocab_size, temperature, chunk_size):
    """Validate the LM-head inputs; returns (shard, temperature, hidden as [T, H], labels as [T])."""
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            found = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a floating tensor, found {found}")
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard: expected [V_local, H], found shape {tuple(weight_shard.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"hidden: expected [..., H] with H = {weight_shard.shape[1]} (weight_shard's "
                         f"second dim), found shape {tuple(hidden.shape)}")
    if hidden.dtype != weight_shard.dtype:
        raise ValueError(f"hidden: expected dtype {weight_shard.dtype} (that of weight_shard), found {hidden.dtype}")
    if hidden.device != weight_shard.device or labels.device != hidden.device:
        raise ValueError(f"hidden/weight_shard/labels: expected one device, found {hidden.device}, "
                         f"{weight_shard.device}, {labels.device}")
    temperature = check_temperature(temperature)
    check_chunk_size(chunk_size)
    shard = make_shard(weight_shard.shape[0], tp_group, vocab_size)
    check_labels(labels, hidden.shape[:-1], shard, "hidden")
    return shard, temperature, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


class _FusedHeadLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shard: VocabShard, temperature: float, group, chunk: int):
        t, cd = hidden.shape[0], compute_dtype(hidden.dtype)
        mm = HeadGemms(weight[:shard.valid], cd)
        logprob, entropy = hidden.new_empty(t, dtype=cd), hidden.new_empty(t, dtype=cd)
        saved = hidden.new_empty(3, t, dtype=cd)  # max, sum_exp, mean_shifted
        ws = Workspace(min(chunk, t), shard.valid, cd, hidden.device)
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            z = mm.logits(hidden[a:b], ws.z)
            _, st = chunk_stats(z, labels[a:b], shard, temperature, group, ws.e)
            logprob[a:b], entropy[a:b] = st.logprob, st.entropy
            saved[0, a:b], saved[1, a:b], saved[2, a:b] = st.max, st.sum_exp, st.mean_shifted
        ctx.save_for_backward(hidden, weight, labels, saved)
        ctx.shard, ctx.temperature, ctx.group, ctx.chunk = shard, temperature, group, chunk
        ctx.weight = weight  # the parameter object itself: megatron DDP's main_grad is an attribute of it
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        hidden, weight, labels, saved = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logprob is None and g_entropy is None) or not (need_h or need_w):
            return (None,) * 7
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk
        m, sum_exp, mean_shifted = saved
        t, cd = hidden.shape[0], saved.dtype
        mm = HeadGemms(weight[:shard.valid], cd)
        dh = torch.zeros_like(hidden) if need_h else None
        dw = hidden.new_zeros(shard.valid, hidden.shape[1], dtype=cd) if need_w else None
        g1 = None if g_logprob is None else g_logprob.to(cd)
        g2 = None if g_entropy is None else g_entropy.to(cd)
        ws = Workspace(min(chunk, t), shard.valid, cd, hidden.device)
        plan = rows_by_chunk(any_nonzero(g1, g2), chunk)
        for a in range(0, t, chunk):
            b = min(t, a + chunk)
            rows = plan[a // chunk]
            if rows is not None and rows.numel() == 0:
                continue
            # Only the rows with a gradient are recomputed and differentiated.
            idx = slice(a, b) if rows is None else rows + a
            h = hidden[idx]
            z = mm.logits(h, ws.z)
            if temperature != 1.0:
                z.div_(temperature)
            z.sub_(m[idx, None])
            e = torch.exp(z, out=ws.e[:z.shape[0]])
            dz = logits_grad(e, z, labels[idx], shard, temperature, sum_exp[idx], mean_shifted[idx],
                             None if g1 is None else g1[idx], None if g2 is None else g2[idx])
            mm.add_grads(dz, h, rows, None if dh is None else dh[a:b], dw)
        if dh is not None:
            all_reduce(dh, dist.ReduceOp.SUM, ctx.group)
        dw = None if dw is None else deliver_weight_grad(ctx.weight, dw, shard)
        return dh, dw, None, None, None, None, None


def fused_head_logprobs_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(label) and entropy per token from hidden states and the LM-head weight shard.

    Args:
        hidden: [T, H] (or [..., H]) final hidden states, replicated on every TP rank.
        weight_shard: [V_local, H] this rank's rows of the output-layer (or tied embedding)
            weight; rank r holds global ids [r*V_local, (r+1)*V_local).
        labels: [T] (or [...]) global target ids in [0, vocab_size).
        tp_group: the tensor-parallel group; None on one process.
        temperature: softmax over logits / temperature.
        vocab_size: the true vocabulary when V_local * tp size includes padding.
        chunk_size: rows per logits chunk; None picks about 2**25 / V_local rows. Peak extra
            memory is O(chunk_size * V_local).

    Returns:
        (logprobs, entropy) shaped like `labels`, fp32 (fp64 for fp64 inputs), differentiable
        w.r.t. `hidden` (the gradient is summed over the TP group) and `weight_shard` (local).

    Raises:
        ValueError: mismatched shapes, dtypes or devices, labels out of range, or bad
            temperature / vocab_size / chunk_size.
    """
    shard, temperature, h2d, labels1d = check_head_inputs(
        hidden, weight_shard, labels, tp_group, vocab_size, temperature, chunk_size)
    chunk = default_chunk(max(h2d.shape[0], 1), shard.local_size, chunk_size)
    logprobs, entropy = _FusedHeadLogprobEntropy.apply(
        h2d, weight_shard, labels1d, shard, temperature, tp_group, chunk)
    return logprobs.view(labels.shape), entropy.view(labels.shape)

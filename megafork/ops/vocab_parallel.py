"""Token log-probs and entropy from vocab-parallel logits (Megatron's TP layout).

`vocab_parallel_logprobs_entropy` takes the [..., V_local] logits shard that a Megatron
`ColumnParallelLinear` output layer produces with `parallel_output=True` (rank r holds global
ids [r*V_local, (r+1)*V_local)) and returns the exact fp32 log-prob of each label and the
entropy of each row's full softmax. Two all-reduces per row block (MAX, then one SUM of three
stacked [rows] vectors) make the result independent of the TP size.

The backward is analytic (see `vocab_stats`): it recomputes exp(s - m) block by block from the
saved logits and per-row statistics, so autograd never stores a softmax the size of the logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megafork.ops.vocab_stats import (
    VocabShard,
    Workspace,
    check_labels,
    check_temperature,
    chunk_stats,
    compute_dtype,
    default_chunk,
    logits_grad,
    make_shard,
)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shard: VocabShard, temperature: float, group, chunk: int):
        n, cd = logits.shape[0], compute_dtype(logits.dtype)
        logprob, entropy = logits.new_empty(n, dtype=cd), logits.new_empty(n, dtype=cd)
        saved = logits.new_empty(3, n, dtype=cd)  # max, sum_exp, mean_shifted
        ws = Workspace(min(chunk, n), shard.valid, cd, logits.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = ws.z[:b - a].copy_(logits[a:b, :shard.valid])
            _, st = chunk_stats(z, labels[a:b], shard, temperature, group, ws.e)
            logprob[a:b], entropy[a:b] = st.logprob, st.entropy
            saved[0, a:b], saved[1, a:b], saved[2, a:b] = st.max, st.sum_exp, st.mean_shifted
        ctx.save_for_backward(logits, labels, saved)
        ctx.shard, ctx.temperature, ctx.chunk = shard, temperature, chunk
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_logprob, g_entropy):
        if g_logprob is None and g_entropy is None:
            return (None,) * 6
        logits, labels, saved = ctx.saved_tensors
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk
        m, sum_exp, mean_shifted = saved
        n, cd = logits.shape[0], saved.dtype
        grad = torch.zeros_like(logits)
        ws = Workspace(min(chunk, n), shard.valid, cd, logits.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = ws.z[:b - a].copy_(logits[a:b, :shard.valid])
            if temperature != 1.0:
                z.div_(temperature)
            z.sub_(m[a:b, None])
            e = torch.exp(z, out=ws.e[:b - a])
            dz = logits_grad(e, z, labels[a:b], shard, temperature, sum_exp[a:b], mean_shifted[a:b],
                             None if g_logprob is None else g_logprob[a:b].to(cd),
                             None if g_entropy is None else g_entropy[a:b].to(cd))
            grad[a:b, :shard.valid] = dz
        return grad, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log p(label) and softmax entropy per row from a vocab-sharded logits tensor.

    Args:
        logits_shard: [..., V_local] logits of this TP rank's vocab slice (any float dtype).
        labels: [...] global target ids in [0, vocab_size).
        tp_group: the tensor-parallel group the vocabulary is split over; None on one process.
        temperature: the softmax is taken over logits / temperature (the rollout temperature).
        vocab_size: the true vocabulary size when the padded vocab (V_local * tp size) is
            larger; the padding columns take no part in the softmax. None: no padding.

    Returns:
        (logprobs, entropy), each shaped like `labels`, fp32 (fp64 for fp64 logits). Both are
        differentiable w.r.t. `logits_shard`; the entropy's gradient is computed only if it is
        used.

    Raises:
        ValueError: a non-float logits tensor, labels of the wrong shape/dtype/range, a bad
            temperature or vocab_size.
    """
    if not isinstance(logits_shard, torch.Tensor) or not logits_shard.is_floating_point() \
            or logits_shard.dim() < 1:
        found = f"dtype {logits_shard.dtype}, shape {tuple(logits_shard.shape)}" \
            if isinstance(logits_shard, torch.Tensor) else type(logits_shard).__name__
        raise ValueError(f"logits_shard: expected a floating tensor [..., V_local], found {found}")
    temperature = check_temperature(temperature)
    shard = make_shard(logits_shard.shape[-1], tp_group, vocab_size)
    check_labels(labels, logits_shard.shape[:-1], shard, "logits_shard")
    if labels.device != logits_shard.device:
        raise ValueError(f"labels: expected device {logits_shard.device} (that of logits_shard), "
                         f"found {labels.device}")
    logits2d = logits_shard.reshape(-1, shard.local_size)
    chunk = default_chunk(max(logits2d.shape[0], 1), shard.local_size, None)
    logprobs, entropy = _VocabParallelLogprobEntropy.apply(
        logits2d, labels.reshape(-1), shard, temperature, tp_group, chunk)
    return logprobs.view(labels.shape), entropy.view(labels.shape)

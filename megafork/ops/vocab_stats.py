"""Exact softmax statistics over a vocab-sharded row block, and their gradients.

Everything the three ops in this package share lives here, so the maths exists once:

* `VocabShard`: which global ids a TP rank holds and how many of them are real (not padding).
* `chunk_stats`: for a block of logits rows on one rank, the max / sum-exp / sum p*z / target
  statistics, all-reduced over the TP group (one MAX and one SUM all-reduce per block), and the
  per-row log-prob and entropy derived from them.
* `logits_grad`: d(g1*logprob + g2*entropy)/dz for a block, built in place from the
  exponentials that `chunk_stats` already produced.

Conventions: s = z / temperature and m = max_j s_j over the whole (unpadded) vocabulary. A block
is shifted in place to s - m, so nothing overflows for logits of any magnitude, and
e = exp(s - m), S = sum e, W = sum e * (s - m). Then

    logprob = (s_y - m) - log S
    entropy = log S - W / S
    d logprob / dz = (onehot - p) / temperature
    d entropy / dz = -p * ((s - m) - W / S) / temperature
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

# One [rows, V_local] fp32 buffer of this many elements is 128 MiB; the ops keep two (see Workspace).
DEFAULT_CHUNK_ELEMENTS = 2**25


@dataclass(frozen=True)
class VocabShard:
    """The slice of the (padded) vocabulary held by one TP rank, Megatron's contiguous layout.

    Attributes:
        offset: global id of local column 0 (tp_rank * local_size).
        local_size: V_local, the number of columns on this rank, padding included.
        valid: how many of the local columns are real ids (< vocab_size); a prefix of the shard.
        vocab_size: the true vocabulary size.
        tp_rank: this rank's index in the TP group.
        tp_size: the TP group size.
    """

    offset: int
    local_size: int
    valid: int
    vocab_size: int
    tp_rank: int
    tp_size: int


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in `group`; (0, 1) when group is None or torch.distributed is not running."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce that is a no-op on one process."""
    if group_rank_size(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def make_shard(local_size: int, tp_group: dist.ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    """Describe this rank's vocab shard, validating `vocab_size` against the padded size."""
    rank, size = group_rank_size(tp_group)
    padded = local_size * size
    if vocab_size is None:
        vocab_size = padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size: expected an int or None, found {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= padded:
        raise ValueError(f"vocab_size: expected 1 <= vocab_size <= padded vocab {padded} "
                         f"(V_local {local_size} x tp size {size}), found {vocab_size}")
    offset = rank * local_size
    valid = max(0, min(local_size, vocab_size - offset))
    return VocabShard(offset, local_size, valid, vocab_size, rank, size)


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)) \
            or isinstance(temperature, bool):
        raise ValueError(f"temperature: expected a positive float, found {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, found {temperature}")
    return float(temperature)


def check_labels(labels: torch.Tensor, lead_shape: torch.Size, shard: VocabShard, what: str) -> None:
    """Labels must be integer global ids in [0, vocab_size) with the leading shape of `what`."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels: expected an integer tensor of global token ids, found dtype {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels: expected shape {tuple(lead_shape)} (the leading dims of {what}), "
                         f"found {tuple(labels.shape)}")
    if labels.numel():
        lo, hi = labels.min(), labels.max()
        if _deferred is not None:  # checked at the end of the `deferred_checks` block, without a sync here
            _deferred.append((lo, hi, shard))
        else:
            _raise_if_out_of_range(int(lo), int(hi), shard)


def _raise_if_out_of_range(lo: int, hi: int, shard: VocabShard) -> None:
    if lo < 0 or hi >= shard.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels (tp rank {shard.tp_rank}): expected ids in [0, {shard.vocab_size}), found {bad}")


# Label ranges awaiting their check: (min, max, shard) per op call, inside `deferred_checks`.
_deferred: list[tuple[torch.Tensor, torch.Tensor, VocabShard]] | None = None


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Check the ops' label ranges once, at the end of the block, instead of once per call.

    Reading a label's min/max on the host stalls the GPU until every queued kernel has run;
    per micro-batch that is a sync per op call. Inside this block the ops only queue the min
    and max on the device, and leaving the block reads them all at once (one sync) and raises
    the same ValueError as the immediate check. Out-of-range labels are harmless meanwhile: the
    ops clamp the columns they gather, so nothing reads out of bounds before the error.
    Nested blocks check at the outermost exit. An exception inside the block skips the check.
    """
    global _deferred
    outer = _deferred
    if outer is None:
        _deferred = []
    try:
        yield
        if outer is None and _deferred:
            pending = _deferred
            dev = pending[0][0].device
            bounds = torch.stack([torch.stack([lo, hi]).to(device=dev, dtype=torch.int64)
                                  for lo, hi, _ in pending]).tolist()  # the one host sync
            for (lo, hi), (_, _, shard) in zip(bounds, pending, strict=True):
                _raise_if_out_of_range(lo, hi, shard)
    finally:
        if outer is None:
            _deferred = None


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, found {chunk_size!r}")


def default_chunk(rows: int, cols: int, chunk_size: int | None) -> int:
    """Rows per block: `chunk_size`, or as many as fit DEFAULT_CHUNK_ELEMENTS."""
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(cols, 1))
    return max(1, min(chunk_size, rows))


class Workspace:
    """Two reusable [chunk, cols] buffers for the logits and their exponentials.

    Re-allocating a block-sized tensor per chunk costs a page fault per 4 KiB on CPU (about as
    much as the exp itself); one allocation per call avoids that and bounds the peak.
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.z = torch.empty(rows, cols, dtype=dtype, device=device)
        self.e = torch.empty(rows, cols, dtype=dtype, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32; fp64 stays fp64 (used by the float64 reference checks)."""
    return torch.promote_types(dtype, torch.float32)


class ChunkStats(NamedTuple):
    """Per-row results for one block, identical on every TP rank."""

    logprob: torch.Tensor  # [c]
    entropy: torch.Tensor  # [c]
    max: torch.Tensor  # [c] m, on the s = z / temperature scale
    sum_exp: torch.Tensor  # [c] S
    mean_shifted: torch.Tensor  # [c] W / S = sum_j p_j (s_j - m)


def local_targets(labels: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column clamped into range, bool: the target lives on this rank)."""
    local = labels - shard.offset
    on_rank = (local >= 0) & (local < shard.valid)
    return local.clamp(0, max(shard.valid - 1, 0)), on_rank


def chunk_stats(z: torch.Tensor, labels: torch.Tensor, shard: VocabShard, temperature: float,
                group: dist.ProcessGroup | None, e_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ChunkStats]:
    """Statistics of one block of logits; `z` is consumed (used as scratch).

    Args:
        z: [c, shard.valid] logits (padding columns already dropped), owned by the caller, in the
            compute dtype. It is used as scratch: on return it holds e * (s - m).
        labels: [c] global target ids.
        shard: this rank's vocab shard.
        temperature: s = z / temperature.
        group: the TP group (None on one process).
        e_out: optional workspace of at least [c, shard.valid] for exp(s - m).

    Returns:
        (e, stats): e = exp(s - m), shape [c, shard.valid], and the per-row statistics.
    """
    c = z.shape[0]
    if temperature != 1.0:
        z.div_(temperature)
    if shard.valid > 0:
        m = z.amax(dim=1)
    else:  # every column of this rank is padding
        m = z.new_full((c,), -math.inf)
    all_reduce(m, dist.ReduceOp.MAX, group)
    z.sub_(m[:, None])
    e = torch.exp(z) if e_out is None else torch.exp(z, out=e_out[:c])
    col, on_rank = local_targets(labels, shard)
    sums = z.new_zeros(3, c)
    if shard.valid > 0:
        sums[2] = torch.where(on_rank, z.gather(1, col[:, None]).squeeze(1), 0.0)
        torch.sum(e, dim=1, out=sums[0])
        # sum e (s - m) in place: no [c, V] temporary, and half the time of a batched dot.
        torch.sum(z.mul_(e), dim=1, out=sums[1])
    all_reduce(sums, dist.ReduceOp.SUM, group)
    sum_exp, dot, target = sums.unbind(0)
    log_s = torch.log(sum_exp)
    mean_shifted = dot / sum_exp
    # True entropy is >= 0; rounding can leave -1e-8 on one-hot rows, which downstream checks reject.
    entropy = (log_s - mean_shifted).clamp_min_(0.0)
    return e, ChunkStats(target - log_s, entropy, m, sum_exp, mean_shifted)


def logits_grad(e: torch.Tensor, shifted: torch.Tensor | None, labels: torch.Tensor, shard: VocabShard,
                temperature: float, sum_exp: torch.Tensor, mean_shifted: torch.Tensor,
                g_logprob: torch.Tensor | None, g_entropy: torch.Tensor | None) -> torch.Tensor:
    """d(g_logprob * logprob + g_entropy * entropy)/dz for one block, built in place in `e`.

    Args:
        e: [c, valid] exp(s - m); overwritten with the result.
        shifted: [c, valid] s - m; needed (and overwritten) only when g_entropy is given.
        labels: [c] global target ids.
        shard: this rank's vocab shard.
        temperature: the temperature used in the forward.
        sum_exp, mean_shifted: [c] S and W / S from `chunk_stats`.
        g_logprob, g_entropy: [c] upstream gradients, or None for zero.

    Returns:
        The gradient w.r.t. the raw logits z of the valid columns ([c, valid], aliasing `e`).
    """
    scale = 1.0 / (sum_exp * temperature)
    if g_entropy is None:
        e.mul_((-g_logprob * scale)[:, None])
    else:
        a = -(g_logprob - g_entropy * mean_shifted) * scale if g_logprob is not None \
            else g_entropy * mean_shifted * scale
        b = -g_entropy * scale
        e.mul_(shifted.mul_(b[:, None]).add_(a[:, None]))
    if g_logprob is not None and shard.valid > 0:
        col, on_rank = local_targets(labels, shard)
        e.scatter_add_(1, col[:, None], torch.where(on_rank, g_logprob / temperature, 0.0)[:, None].to(e.dtype))
    return e


def rows_by_chunk(active: torch.Tensor, chunk: int) -> list[torch.Tensor | None]:
    """Per block of `chunk` rows, the indices (within the block) of the `active` rows.

    The LM-head gradient GEMMs then run only over these rows, so their cost scales with the
    fraction of tokens that carry a gradient (the forking tokens). The GEMM sizes must be known
    on the host, so this reads the per-block counts once for the whole call (one host sync),
    where a `nonzero` per block would sync once per block.

    Args:
        active: [T] bool, the rows that carry a gradient.
        chunk: rows per block (the last block may be shorter).

    Returns:
        One entry per block: None when every row of the block is active, else a (possibly
        empty) long tensor of row indices relative to the block start, ascending.
    """
    t = active.numel()
    n_blocks = -(-t // chunk)
    flags = active.to(torch.int32)
    padded = torch.nn.functional.pad(flags, (0, n_blocks * chunk - t))
    counts = padded.view(n_blocks, chunk).sum(1).tolist()  # the one host sync
    # Active rows first, each group in ascending order: a stable sort, no data-dependent shape.
    order = torch.argsort(1 - flags, stable=True)[:sum(counts)]
    out: list[torch.Tensor | None] = []
    start = 0
    for i, n in enumerate(counts):
        rows = min(chunk, t - i * chunk)
        out.append(None if n == rows else order[start:start + n] - i * chunk)
        start += n
    return out


def any_nonzero(*grads: torch.Tensor | None) -> torch.Tensor | None:
    """[T] bool: rows where any of `grads` is non-zero (None when no gradient is given)."""
    active = None
    for g in grads:
        if g is not None:
            active = (g != 0) if active is None else active | (g != 0)
    return active

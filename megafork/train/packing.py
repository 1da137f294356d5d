"""Token-budget micro-batches: bin-pack a rank's sequences, the same count on every DP rank.

    mbs, spans = pack_minibatches(my_share, PackingSpec(max_tokens=16384, pad_id=0), dp_group=groups.dp)

With `train.max_tokens_per_microbatch > 0` each mini-batch's sequences are packed first-fit
decreasing into packed rows (`megafork.train.batch.pack_row`) of at most that many tokens,
padding included. A sequence longer than the budget gets a row of its own (logged, not an
error). Then the DP ranks agree on the count of each mini-batch (MAX over DP) and a rank with
less work appends empty micro-batches: they carry no label, so zero loss and zero tokens, but
they run the same forward/backward, so PP schedules and collectives match on every rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megafork.train.batch import MicroBatch, Trajectory, pack_microbatches, pack_row, seq_len

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingSpec:
    """How a rank's sequences become micro-batches.

    Attributes:
        max_tokens: token budget of a packed micro-batch (0: padded rows of `micro_batch_size`).
        micro_batch_size: rows per padded micro-batch (used when `max_tokens` is 0).
        pad_id: id written into padding.
        multiple: micro-batch lengths are rounded up to a multiple of this (`train.pad_multiple`,
            and TP under sequence parallelism); a packed row gets that padding at its end only.
    """

    max_tokens: int = 0
    micro_batch_size: int = 1
    pad_id: int = 0
    multiple: int = 1

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"train.max_tokens_per_microbatch: expected >= 0 (0 = off), found {self.max_tokens}")
        if self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size: expected >= 1, found {self.micro_batch_size}")
        if self.multiple < 1:
            raise ValueError(f"packing multiple: expected >= 1, found {self.multiple}")
        if self.max_tokens and self.max_tokens < self.multiple:
            raise ValueError(f"train.max_tokens_per_microbatch: expected >= the padding multiple {self.multiple} "
                             f"(the TP size under sequence parallelism), found {self.max_tokens}")


def first_fit_decreasing(lengths: list[int], budget: int, multiple: int = 1) -> list[list[int]]:
    """Bin-pack item indices so that each bin's total, rounded up to `multiple`, fits `budget`.

    Items are taken longest first (ties by index) and put into the first bin they fit; an item
    that fits no bin opens a new one, so an item longer than the budget sits alone. Bins are
    returned in opening order, each listing its items in placement order (deterministic).

    Args:
        lengths: token count of each item.
        budget: bin capacity in tokens (> 0).
        multiple: each bin is padded up to a multiple of this; the padding counts.
    """
    if budget < 1:
        raise ValueError(f"first_fit_decreasing: expected a budget >= 1, found {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = lengths[i]
        for b, load in enumerate(loads):
            if -(-(load + n) // multiple) * multiple <= budget:
                bins[b].append(i)
                loads[b] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return bins


def pack_by_budget(trajs: list[Trajectory], spec: PackingSpec) -> list[MicroBatch]:
    """This rank's sequences of one mini-batch as packed rows of at most `spec.max_tokens` tokens."""
    lengths = [seq_len(t) for t in trajs]
    bins = first_fit_decreasing(lengths, spec.max_tokens, spec.multiple)
    over = [lengths[b[0]] for b in bins if lengths[b[0]] > spec.max_tokens]
    if over:
        log.info("%d sequence(s) longer than train.max_tokens_per_microbatch=%d (up to %d tokens) each got a "
                 "micro-batch of their own", len(over), spec.max_tokens, max(over))
    return [pack_row([trajs[i] for i in b], spec.pad_id, spec.multiple) for b in bins]


def pack_minibatches(minis: list[list[Trajectory]], spec: PackingSpec, dp_group=None,
                     device: torch.device | None = None) -> tuple[list[MicroBatch], list[list[int]]]:
    """Pack each mini-batch's trajectories into micro-batches, the same count on every DP rank.

    Args:
        minis: this rank's trajectories of each optimizer mini-batch (the same number of
            mini-batches on every DP rank; some may be empty).
        spec: the layout (token budget or padded rows).
        dp_group: the data-parallel group the counts are agreed over (None: one rank). Every
            rank of the group must call this, even with no trajectories.
        device: the device of the count all-reduce (the backend's: CUDA for NCCL).

    Returns:
        (all micro-batches, the indices of each mini-batch's micro-batches). A mini-batch that
        is empty on every DP rank has no micro-batches and no span.
    """
    per_mini = pack_each(minis, spec)
    counts = torch.tensor([len(p) for p in per_mini], dtype=torch.int64, device=device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1 and counts.numel():
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=dp_group)
    return equalize(per_mini, counts.tolist(), spec)


def pack_each(minis: list[list[Trajectory]], spec: PackingSpec) -> list[list[MicroBatch]]:
    """Each mini-batch's trajectories as micro-batches (token budget or padded rows), no agreement."""
    return [(pack_by_budget(mine, spec) if spec.max_tokens else
             pack_microbatches(mine, spec.micro_batch_size, spec.pad_id, spec.multiple)) if mine else []
            for mine in minis]


def equalize(per_mini: list[list[MicroBatch]], counts: list[int], spec: PackingSpec
             ) -> tuple[list[MicroBatch], list[list[int]]]:
    """Top each mini-batch up to `counts[m]` micro-batches with empty ones; flatten with spans."""
    microbatches: list[MicroBatch] = []
    spans: list[list[int]] = []
    for packed, want in zip(per_mini, counts, strict=True):
        packed = packed + [empty_microbatch(spec) for _ in range(want - len(packed))]
        if packed:
            spans.append(list(range(len(microbatches), len(microbatches) + len(packed))))
            microbatches += packed
    return microbatches, spans


def empty_microbatch(spec: PackingSpec) -> MicroBatch:
    """A micro-batch with no sequence: `spec.multiple` padding tokens, no labels, no loss."""
    mb = pack_row([], spec.pad_id, spec.multiple)
    if not spec.max_tokens:
        mb.cu_seqlens = None  # the padded layout: one row of padding under the plain causal mask
    return mb


def layout_stats(microbatches: list[MicroBatch], spans: list[list[int]], dp_group=None,
                 device: torch.device | None = None) -> dict:
    """The step's layout metrics over the DP group (identical on every rank of it).

    Args:
        microbatches: this rank's micro-batches.
        spans: the micro-batch indices of each optimizer mini-batch (the same count on every rank).
        dp_group: the data-parallel group (None: one rank).
        device: the device of the all-reduces.

    Returns:
        `pad_fraction`: padding / processed tokens; `dp_token_imbalance`: Σ over mini-batches of
        the busiest rank's processed tokens / Σ of the mean rank's (each mini-batch ends in a
        gradient all-reduce, so this is the step's time against perfect balance when time follows
        tokens); `microbatches_per_rank` and `max_microbatch_tokens` (max over DP).
    """
    per_mini = [float(sum(microbatches[i].tokens.numel() for i in span)) for span in spans]
    real = float(sum(mb.real_tokens for mb in microbatches))
    biggest = float(max((mb.tokens.numel() for mb in microbatches), default=0))
    sums = torch.tensor([sum(per_mini), real, *per_mini], dtype=torch.float64, device=device)
    peaks = torch.tensor([biggest, float(len(microbatches)), *per_mini], dtype=torch.float64, device=device)
    ranks = 1
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        ranks = dist.get_world_size(dp_group)
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=dp_group)
    total, real_total = sums[:2].tolist()
    busiest = float(peaks[2:].sum())
    return {
        "pad_fraction": (total - real_total) / total if total else 0.0,
        "dp_token_imbalance": busiest / (total / ranks) if total else 1.0,
        "microbatches_per_rank": float(peaks[1]),
        "max_microbatch_tokens": float(peaks[0]),
    }

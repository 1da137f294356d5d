"""Forking-token selection: the exact top-ρ entropy threshold over a process group.

    from megafork.forking import topk_threshold, select_forking_tokens
    tau = topk_threshold(entropy, mask, ratio, group=None)                   # float
    sel = select_forking_tokens(entropy, mask, ratio, mode="top", group=None,
                                ties="include", generator=None)              # bool, like mask

The threshold is the exact k-th largest entropy among the tokens where `mask` is true on all
ranks of `group`, k = ceil(ratio · N_valid_total), found by a two-pass radix select over the
fp32 bit patterns: each pass is a local 2^16-bin histogram (C++ `megafork._C` for CPU tensors,
torch ops for CUDA tensors) and one all_reduce(SUM) of 2^16 int64 counts (512 KiB), whatever N
is. Ranks may hold any number of tokens, zero included. When no rank holds a valid token the
threshold is +inf and the selection is empty.

How the trainer maps its selection scope onto calls (groups come from `ParallelGroups`):

=============  ================================================  ===========  ===========
scope          entropy / mask passed on each rank                group        ties
=============  ================================================  ===========  ===========
"step"         every response token of the step on this rank     ``dp_cp``    "include"
               (all micro-batches, flattened or concatenated)
"minibatch"    the tokens of one optimizer mini-batch            ``dp_cp``    "include"
"microbatch"   the tokens of one micro-batch                     ``dp_cp``    "include"
"local"        the tokens of one micro-batch                     None         "topk"
=============  ================================================  ===========  ===========

- "step" is the paper's formula (τ_ρ over the batch's response tokens) and the default.
  "local" reproduces the released code: per micro-batch, per DP rank, exactly k tokens by
  `torch.topk`, ties broken arbitrarily.
- The group is dp×cp: under context parallelism each CP rank holds a slice of every sequence,
  so CP must be in the group for the threshold to see whole responses. TP ranks hold identical
  entropies after the vocab-parallel reductions, so TP stays out of the group (it would only
  duplicate every count). With PP, the stage that computes entropies (the last) selects.
- Every rank of the group must make the same calls in the same order with the same `ratio`,
  `mode` and `ties`: for "microbatch", all DP ranks must have the same number of micro-batches.
  A different `ratio` or top/bottom/random `mode` on some rank is caught (a signature of the
  arguments rides in the first histogram) and raises on every rank; "all" and ties="topk"
  make no collective at all, so mixing them with the other modes across ranks would hang.
- Bad input on one rank (NaN/inf/negative entropy, shape or dtype mismatch, a ratio outside
  (0, 1]) raises ValueError on every rank of the group: the error travels with the first
  histogram, so no rank is left waiting in a collective.
"""
from megafork.forking.histogram import radix_histogram, radix_histogram_torch
from megafork.forking.radix_select import RadixResult, radix_select
from megafork.forking.selection import (
    bottomk_threshold,
    num_forking_tokens,
    select_forking_tokens,
    topk_threshold,
)

__all__ = [
    "RadixResult",
    "bottomk_threshold",
    "num_forking_tokens",
    "radix_histogram",
    "radix_histogram_torch",
    "radix_select",
    "select_forking_tokens",
    "topk_threshold",
]

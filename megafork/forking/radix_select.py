"""Exact k-th largest / k-th smallest over the valid values of every rank of a group.

Two radix passes over the fp32 bit patterns (non-negative floats sort like their bits):

1. each rank histograms the high 16 bits of its valid values; one all_reduce(SUM) of the
   2^16 int64 counts; scanning from the top gives the bin b holding the k-th largest value and
   the number of values above that bin;
2. each rank histograms the low 16 bits of its valid values whose high bits equal b; one more
   all_reduce(SUM); scanning gives the exact bit pattern.

Every rank makes the same two collectives of 2 x 2^16 x 8 bytes whatever its number of values,
zero included: no all-gather, no padding. A rank whose input is bad still takes part in pass 1:
the pass-1 histogram carries an error flag per rank in its unused bins (those of negative,
inf and NaN bit patterns), so every rank raises together instead of hanging in pass 2.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megafork.forking.histogram import FIRST_INVALID_BIN, NUM_BINS, radix_histogram, radix_histogram_torch

# Pass-1 bins from here on are never produced by valid values; slot FLAG_BIN + group_rank
# carries that rank's error flag through the all_reduce.
FLAG_BIN = 0x8000
MAX_GROUP_SIZE = NUM_BINS - FLAG_BIN
# Two more unused bins carry sum(sig) and sum(sig^2) of a 20-bit signature of each rank's call
# arguments: world * sum(sig^2) == sum(sig)^2 exactly when every rank passed the same ones.
SIG_BIN = FIRST_INVALID_BIN


@dataclass(frozen=True)
class RadixResult:
    """Outcome of a distributed radix select (the same on every rank of the group).

    Attributes:
        n_total: valid values over all ranks.
        k: the rank asked for (1-based; k-th largest, or k-th smallest if `largest=False`).
        bits: fp32 bit pattern of the selected value, or None when `n_total == 0`.
        count_beyond: values strictly beyond it (greater for largest, smaller for smallest).
        count_equal: values whose bit pattern equals `bits` (so count_beyond < k <= count_beyond
            + count_equal).
    """

    n_total: int
    k: int
    bits: int | None
    count_beyond: int
    count_equal: int

    @property
    def value(self) -> float | None:
        """The selected value as a Python float (exactly the fp32 value), or None if empty."""
        if self.bits is None:
            return None
        return struct.unpack("<f", struct.pack("<I", self.bits))[0]


def rank_name() -> str:
    """'rank R' (global rank) for error messages; 'rank 0' on a single process."""
    if not dist.is_available() or not dist.is_initialized():
        return "rank 0"
    return f"rank {dist.get_rank()}"


def local_histogram(values: torch.Tensor, mask: torch.Tensor, shift: int, match_high: int = -1,
                    backend: str = "auto") -> torch.Tensor:
    """Pass histogram of this rank's values: C++ for CPU tensors, torch ops otherwise.

    Args:
        values: 1-D contiguous float32 tensor.
        mask: 1-D bool tensor, same length and device.
        shift: 16 (pass 1) or 0 (pass 2).
        match_high: pass 2's high-bits filter, or -1.
        backend: "auto", "cpp" or "torch" (tests and benchmarks pin one).
    """
    if backend == "auto":
        backend = "cpp" if values.device.type == "cpu" else "torch"
    if backend == "cpp":
        return radix_histogram(values, mask, shift, match_high)
    if backend == "torch":
        return radix_histogram_torch(values, mask, shift, match_high)
    raise ValueError(f"backend: expected 'auto', 'cpp' or 'torch', found {backend!r}")


def _scan_from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in the bins above it."""
    desc = np.cumsum(hist[::-1])  # desc[i] = values in bins >= NUM_BINS - 1 - i
    i = int(np.searchsorted(desc, k, side="left"))
    b = NUM_BINS - 1 - i
    return b, int(desc[i]) - int(hist[b])


def _move_invalid_to_flag(hist: torch.Tensor, me: int) -> None:
    """Replace the counts of negative/inf/NaN values by this rank's 0/1 error flag, in place."""
    if hist.device.type == "cpu":
        # numpy on the shared buffer: torch would split these 32k-bin ops over OpenMP threads,
        # which costs milliseconds on a busy machine.
        h = hist.numpy()
        invalid = bool(h[FIRST_INVALID_BIN:].any())
        h[FIRST_INVALID_BIN:] = 0
        h[FLAG_BIN + me] = int(invalid)
    else:  # device-side, so there is no host sync before the collective
        invalid = hist[FIRST_INVALID_BIN:].sum()
        hist[FIRST_INVALID_BIN:] = 0
        hist[FLAG_BIN + me] = (invalid > 0).to(hist.dtype)


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def describe_invalid(values: torch.Tensor, mask: torch.Tensor) -> str:
    """What is wrong with the valid values (NaN, inf, negative), with the first bad index."""
    v, m = values.reshape(-1), mask.reshape(-1)
    nan, inf, neg = m & torch.isnan(v), m & torch.isinf(v), m & (v < 0)
    bad = torch.nonzero(nan | inf | neg).reshape(-1)
    first = f"; first at flat index {int(bad[0])}: {v[bad[0]].item()}" if bad.numel() else ""
    return (f"entropy must be finite and >= 0 where mask is true; found {int(nan.sum())} NaN, "
            f"{int(inf.sum())} inf and {int(neg.sum())} negative among {int(m.sum())} valid tokens{first}")


def radix_select(
    values: torch.Tensor,
    mask: torch.Tensor,
    k_of_total,
    largest: bool = True,
    group: dist.ProcessGroup | None = None,
    local_error: str | None = None,
    check_values: bool = True,
    backend: str = "auto",
    call_key: str = "",
) -> RadixResult:
    """Find the exact k-th largest (or smallest) valid value over all ranks of `group`.

    Args:
        values: 1-D contiguous float32 tensor of this rank's values (any length, 0 included).
        mask: 1-D bool tensor marking the valid values.
        k_of_total: function from the global valid count N (>= 1) to k in [1, N].
        largest: k-th largest if True, k-th smallest if False.
        group: process group to select over; None selects over this process only.
        local_error: a problem found on this rank before the call (bad shapes, dtype, ratio).
            The rank still joins pass 1 with an error flag, then every rank raises.
        check_values: flag negative, inf and NaN valid values as errors (off for callers that
            pass raw keys rather than entropies).
        backend: histogram implementation, see `local_histogram`.
        call_key: the arguments that must agree on every rank (such as "top ratio=0.2"). A
            mismatch raises ValueError on every rank instead of giving each its own threshold.

    Returns:
        A `RadixResult`, identical on every rank.

    Raises:
        ValueError: on every rank, when any rank had `local_error` or invalid values. The
            offending rank's message says what it found; the others name the offending ranks.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world > MAX_GROUP_SIZE:
        raise ValueError(f"{rank_name()}: the radix select supports groups of at most {MAX_GROUP_SIZE} "
                         f"ranks, found {world}")
    me = 0 if group is None else dist.get_rank(group)
    if local_error is None:
        hist = local_histogram(values, mask, 16, backend=backend)
        _move_invalid_to_flag(hist, me)
    else:
        hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=values.device)
        hist[FLAG_BIN + me] = 1
    sig = zlib.crc32(call_key.encode()) & 0xFFFFF
    hist[SIG_BIN] = sig
    hist[SIG_BIN + 1] = sig * sig
    _all_reduce(hist, group)
    hist = hist.cpu().numpy()
    flagged = np.nonzero(hist[FLAG_BIN:FLAG_BIN + world])[0].tolist()
    if flagged:
        if me in flagged:
            if local_error is None:
                local_error = (describe_invalid(values, mask) if check_values
                               else "selection keys must be bit patterns below 0x7F800000, found larger ones")
            raise ValueError(f"{rank_name()}: {local_error}")
        bad = [r if group is None else dist.get_global_rank(group, r) for r in flagged]
        raise ValueError(f"{rank_name()}: selection aborted on every rank of the group because rank(s) "
                         f"{bad} found invalid input (see their error); this rank's input is valid")

    sum_sig, sum_sig2 = int(hist[SIG_BIN]), int(hist[SIG_BIN + 1])
    if world * sum_sig2 != sum_sig * sum_sig:
        raise ValueError(f"{rank_name()}: the ranks of the group called the selection with different "
                         f"arguments; this rank passed {call_key}")
    hist[SIG_BIN:SIG_BIN + 2] = 0
    n_total = int(hist.sum())  # the invalid, flag and signature bins are all zero here
    if n_total == 0:
        return RadixResult(n_total=0, k=0, bits=None, count_beyond=0, count_equal=0)
    k = int(k_of_total(n_total))
    if not 1 <= k <= n_total:
        raise ValueError(f"{rank_name()}: k must be in [1, {n_total}], found {k}")
    # The k-th smallest is the (N - k + 1)-th largest.
    k_top = k if largest else n_total - k + 1
    high, above_high = _scan_from_top(hist, k_top)

    hist2 = local_histogram(values, mask, 0, match_high=high, backend=backend)
    _all_reduce(hist2, group)
    hist2 = hist2.cpu().numpy()
    if int(hist2.sum()) != int(hist[high]):
        raise RuntimeError(f"{rank_name()}: pass 2 counted {int(hist2.sum())} values in bin {high:#06x}, "
                           f"pass 1 counted {int(hist[high])}; were the values modified in between?")
    low, above_low = _scan_from_top(hist2, k_top - above_high)
    bits = (high << 16) | low
    count_equal = int(hist2[low].item())
    above = above_high + above_low
    beyond = above if largest else n_total - above - count_equal
    return RadixResult(n_total=n_total, k=k, bits=bits, count_beyond=beyond, count_equal=count_equal)

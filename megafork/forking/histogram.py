"""Local 2^16-bin radix histograms of fp32 bit patterns: the C++ kernel and its torch twin.

Both functions count `(bits >> shift) & 0xFFFF` over the float32 values where `mask` is true,
optionally only among values whose high 16 bits equal `match_high` (radix-select pass 2).
`radix_histogram` runs the C++ extension `megafork._C` on CPU tensors (one pass, std::threads,
GIL released); `radix_histogram_torch` does the same with torch ops on any device and is what
CUDA tensors use. The two must agree bit for bit; tests hold them to it.

-0.0 is counted as +0.0. Negative values, inf and NaN land in high bins >= `FIRST_INVALID_BIN`,
which is how the selection code checks its input without an extra pass.
"""
from __future__ import annotations

import torch

from megafork import _C

NUM_BINS = 1 << 16
# High 16 bits of +inf (0x7F800000): every non-finite or negative fp32 value has high bits >= this.
FIRST_INVALID_BIN = 0x7F80
_NEG_ZERO_BITS = -(1 << 31)  # 0x80000000 read as int32


def _check_args(values: torch.Tensor, mask: torch.Tensor | None, shift: int, match_high: int) -> None:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a torch.Tensor, found {type(values).__name__}")
    if values.dtype != torch.float32:
        raise ValueError(f"values: expected dtype torch.float32, found {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"values: expected a 1-D tensor, found shape {tuple(values.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected dtype torch.bool, found {mask.dtype}")
        if mask.shape != values.shape:
            raise ValueError(f"mask: expected shape {tuple(values.shape)} (as values), found {tuple(mask.shape)}")
        if mask.device != values.device:
            raise ValueError(f"mask: expected device {values.device} (as values), found {mask.device}")
    if shift not in (0, 16):
        raise ValueError(f"shift: expected 0 (low 16 bits) or 16 (high 16 bits), found {shift}")
    if match_high >= NUM_BINS:
        raise ValueError(f"match_high: expected < {NUM_BINS} or negative (no filter), found {match_high}")


def radix_histogram(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    shift: int,
    match_high: int = -1,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Histogram of 16 bits of the fp32 bit patterns, computed by the C++ extension.

    Args:
        values: 1-D contiguous float32 CPU tensor.
        mask: 1-D contiguous bool CPU tensor of the same length, or None to count every value.
        shift: 16 to count the high 16 bits (pass 1), 0 for the low 16 bits (pass 2).
        match_high: if >= 0, count only values whose high 16 bits equal it.
        num_threads: worker threads; None uses `torch.get_num_threads()`. Inputs under about
            256k values per thread use fewer threads.

    Returns:
        int64 CPU tensor of shape [65536].

    Raises:
        ValueError: wrong dtype, shape, device or contiguity (use `radix_histogram_torch` for
            CUDA tensors), or a bad `shift`/`match_high`.
    """
    _check_args(values, mask, shift, match_high)
    if values.device.type != "cpu":
        raise ValueError(f"values: the C++ histogram needs a CPU tensor, found device {values.device}; "
                         "use radix_histogram_torch")
    if not values.is_contiguous():
        raise ValueError(f"values: expected a contiguous tensor, found strides {values.stride()}")
    if mask is not None and not mask.is_contiguous():
        raise ValueError(f"mask: expected a contiguous tensor, found strides {mask.stride()}")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads: expected >= 1, found {threads}")
    # .numpy() shares memory with the tensors: no copy on either side of the call.
    np_mask = None if mask is None else mask.numpy()
    hist = _C.radix_histogram(values.detach().numpy(), np_mask, shift, match_high, threads)
    return torch.from_numpy(hist)


def radix_histogram_torch(
    values: torch.Tensor,
    mask: torch.Tensor | None,
    shift: int,
    match_high: int = -1,
) -> torch.Tensor:
    """The pure-torch twin of `radix_histogram`, for any device (CUDA tensors use it).

    Args:
        values: 1-D float32 tensor (any device, any strides).
        mask: 1-D bool tensor of the same length on the same device, or None.
        shift: 16 for the high 16 bits, 0 for the low 16 bits.
        match_high: if >= 0, count only values whose high 16 bits equal it.

    Returns:
        int64 tensor of shape [65536] on `values.device`.
    """
    _check_args(values, mask, shift, match_high)
    bits = values.detach().contiguous().view(torch.int32)
    bits = torch.where(bits == _NEG_ZERO_BITS, torch.zeros_like(bits), bits)
    high = (bits >> 16) & 0xFFFF  # the arithmetic shift sign-extends; the AND drops it
    keep = mask
    if match_high >= 0:
        match = high == match_high
        keep = match if keep is None else keep & match
    field = high if shift == 16 else bits & 0xFFFF
    if keep is not None:
        field = field[keep]
    return torch.bincount(field.long(), minlength=NUM_BINS)

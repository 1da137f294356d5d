"""Flattened weight buckets (SGLang's `load_format="flattened_bucket"`) and tensor checksums.

A bucket is one uint8 tensor holding the raw bytes of several tensors back to back, in the
order of the `names` posted with it. No padding is allowed, so every tensor's byte offset must
be a multiple of its dtype's itemsize (SGLang's receiver rejects unaligned offsets); `pack`
orders a bucket by decreasing itemsize, which guarantees that for power-of-two itemsizes.

    for bucket in iter_buckets(named_tensors, bucket_bytes=512 << 20):
        flat, names, dtypes, shapes = pack(bucket)
        ...broadcast flat...
        tensors = unpack(received, layout(names, dtypes, shapes))
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling SGLang's `dtypes` field carries."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object, field: str = "dtypes") -> torch.dtype:
    """Parse a dtype name ('bfloat16' or 'torch.bfloat16').

    Args:
        name: the name from the request.
        field: where it came from, for the error message.
    """
    if isinstance(name, str):
        dtype = getattr(torch, name.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"{field}: expected a torch dtype name such as 'bfloat16' or 'float32', found {name!r}")


def tensor_checksum(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in its own dtype, independent of device and strides."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return hashlib.sha256(flat.numpy().data).hexdigest()


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside a flattened bucket."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def layout(names: list[str], dtypes: list[torch.dtype], shapes: list[tuple[int, ...]]) -> list[Slot]:
    """Byte layout of a flattened bucket from its metadata; checks alignment and shapes.

    Args:
        names: tensor names, in bucket order.
        dtypes: their dtypes.
        shapes: their shapes.
    """
    slots, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        if any(d < 0 for d in shape):
            raise ValueError(f"shapes: tensor {name!r} has a negative dimension {list(shape)}")
        if offset % dtype.itemsize:
            raise ValueError(f"names: tensor {name!r} ({dtype_name(dtype)}) would start at byte {offset}, "
                             f"not a multiple of its itemsize {dtype.itemsize}; order the bucket by itemsize")
        size = dtype.itemsize * _numel(shape)
        slots.append(Slot(name, dtype, tuple(shape), offset, offset + size))
        offset += size
    return slots


def bucket_bytes(slots: list[Slot]) -> int:
    return slots[-1].end if slots else 0


def pack(named_tensors: list[tuple[str, torch.Tensor]], device: torch.device | None = None,
         out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str], list[torch.dtype], list[tuple[int, ...]]]:
    """Concatenate the raw bytes of tensors into one uint8 tensor.

    Args:
        named_tensors: (name, tensor) pairs; reordered by decreasing itemsize (stable).
        device: where the flat tensor lives (default: the first tensor's device).
        out: optional uint8 buffer to pack into (its first bytes are used); must be large enough.

    Returns:
        (flat uint8 tensor, names, dtypes, shapes) in bucket order.
    """
    if not named_tensors:
        raise ValueError("pack: a bucket needs at least one tensor")
    ordered = sorted(named_tensors, key=lambda nt: -nt[1].element_size())
    names = [n for n, _ in ordered]
    dtypes = [t.dtype for _, t in ordered]
    shapes = [tuple(t.shape) for _, t in ordered]
    slots = layout(names, dtypes, shapes)
    size = bucket_bytes(slots)
    if out is not None:
        if out.dtype != torch.uint8 or out.numel() < size:
            raise ValueError(f"pack: out must be a uint8 buffer of at least {size} bytes, found {out.dtype} x {out.numel()}")
        flat = out[:size]
    else:
        flat = torch.empty(size, dtype=torch.uint8, device=device or ordered[0][1].device)
    for slot, (_, t) in zip(slots, ordered):
        copy_bytes(flat[slot.start:slot.end], t)
    return flat, names, dtypes, shapes


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src`'s raw bytes into `dst` (same byte size; any dtypes).

    CPU to CPU goes through a single-threaded numpy memcpy: it runs at memory bandwidth without
    OpenMP's fork/join, which on an oversubscribed CPU costs a scheduler slice per tensor.
    """
    s = src.detach().contiguous().reshape(-1).view(torch.uint8)
    d = dst.reshape(-1).view(torch.uint8)
    if s.numel() != d.numel():
        raise ValueError(f"copy_bytes: {s.numel()} source bytes into a {d.numel()}-byte destination")
    if s.device.type == "cpu" and d.device.type == "cpu":
        np.copyto(d.numpy(), s.numpy())
    else:
        d.copy_(s)


def unpack(flat: torch.Tensor, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """Views of the tensors inside a received bucket (no copy)."""
    if flat.dtype != torch.uint8 or flat.numel() != bucket_bytes(slots):
        raise ValueError(f"unpack: expected a uint8 tensor of {bucket_bytes(slots)} bytes, "
                         f"found {flat.dtype} with {flat.numel()} elements")
    return [(s.name, t) for s, t in zip(slots, views(flat, slots))]


def views(buf: torch.Tensor, slots: list[Slot]) -> list[torch.Tensor]:
    """Typed, shaped views of `buf` (uint8) at each slot's byte range."""
    return [buf[s.start:s.end].view(s.dtype).reshape(s.shape) for s in slots]


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of tensors into buckets of at most `max_bytes` (a larger tensor goes alone).

    Args:
        named_tensors: (hf_name, full tensor) pairs, consumed lazily.
        max_bytes: bucket capacity in bytes.
    """
    if max_bytes < 1:
        raise ValueError(f"bucket_bytes: expected a positive byte count, found {max_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight sync: expected (hf_name: str, tensor) pairs, found ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class PackedBucket:
    """One flattened bucket ready to send: `flat` holds the tensors' bytes in `names` order."""

    flat: torch.Tensor
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[tuple[int, ...]]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Typed views of the packed tensors (e.g. for checksums)."""
        return unpack(self.flat, layout(self.names, self.dtypes, self.shapes))


class BucketPacker:
    """Packs a stream of tensors straight into reused flat buffers, dropping each once copied.

    Grouping the tensors first (`iter_buckets`) and then packing holds a bucket's worth of
    gathered tensors plus a fresh flat copy of them; on a GPU, with one bucket on the wire, that
    is three buckets of transient memory, each allocated at its own size. Here each tensor is
    copied into the current buffer as it arrives and its reference dropped, so the exporter's
    gathered pieces are freed one by one, and the two buffers (one being sent, one being packed)
    are allocated once at `max_bytes` and reused by every later bucket and sync.

    Tensors stay in arrival order; a bucket is closed early when the next tensor would start at
    an offset that is not a multiple of its itemsize (the receiver rejects that), which for
    a model of one dtype never happens. A tensor larger than `max_bytes` travels alone, as a
    uint8 view of itself, without a copy.

    The caller must be done with bucket i - 1 (its transfer finished) before asking for bucket
    i + 1: that one is packed into the same buffer.
    """

    def __init__(self, max_bytes: int, device: torch.device):
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"bucket_bytes: expected a positive byte count, found {max_bytes!r}")
        self.max_bytes, self.device = max_bytes, torch.device(device)
        self._buffers: list[torch.Tensor | None] = [None, None]

    def packed(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[PackedBucket]:
        """Yield the buckets of `named_tensors` (consumed lazily), alternating the two buffers."""
        slot, offset = 0, 0
        names: list[str] = []
        dtypes: list[torch.dtype] = []
        shapes: list[tuple[int, ...]] = []
        stream = iter(named_tensors)
        while (item := next(stream, None)) is not None:
            name, tensor = item
            item = None  # the loop keeps no reference to a packed tensor
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"weight sync: expected (hf_name: str, tensor) pairs, found ({type(name).__name__}, "
                                f"{type(tensor).__name__})")
            nbytes = tensor.numel() * tensor.element_size()
            if names and (offset + nbytes > self.max_bytes or offset % tensor.element_size()):
                yield PackedBucket(self._buffer(slot)[:offset], names, dtypes, shapes)
                slot, offset, names, dtypes, shapes = 1 - slot, 0, [], [], []
            if nbytes > self.max_bytes:  # alone, uncopied
                flat = tensor.detach().to(self.device).contiguous().reshape(-1).view(torch.uint8)
                shape, dtype = tuple(tensor.shape), tensor.dtype
                del tensor
                yield PackedBucket(flat, [name], [dtype], [shape])
                del flat
                continue
            copy_bytes(self._buffer(slot)[offset:offset + nbytes], tensor)
            names.append(name)
            dtypes.append(tensor.dtype)
            shapes.append(tuple(tensor.shape))
            offset += nbytes
            del tensor  # freed now (the exporter yields fresh copies and keeps none)
        if names:
            yield PackedBucket(self._buffer(slot)[:offset], names, dtypes, shapes)

    def _buffer(self, slot: int) -> torch.Tensor:
        if self._buffers[slot] is None:
            self._buffers[slot] = torch.empty(self.max_bytes, dtype=torch.uint8, device=self.device)
        return self._buffers[slot]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n

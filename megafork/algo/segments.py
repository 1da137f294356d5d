"""Per-sequence views of packed rows, for statistics taken over a whole sequence.

A packed micro-batch holds several sequences in one `[1, S]` row; `cu_seqlens` (int [n + 1])
marks where each starts. Functions that treat "one row = one sequence" (the sequence-level
rollout corrections) take `to_rows(t, cu)`, `[n, L]` with one sequence per row and zeros past
its end, and `from_rows` puts their per-token results back in the packed order.
"""
from __future__ import annotations

import torch


def _index(cu_seqlens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    cols = torch.arange(int(lens.max()) if lens.numel() else 0, device=device)
    return cu[:-1, None] + cols, cols < lens[:, None]


def to_rows(t: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[1, S]` (or `[S]`) per-token values of a packed row as `[n, L]`, one sequence per row.

    Positions past a sequence's end are zero (False for bool tensors).
    """
    flat = t.reshape(-1)
    idx, valid = _index(cu_seqlens, flat.device)
    rows = flat[idx.clamp(max=max(flat.numel() - 1, 0))]
    return torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def from_rows(rows: torch.Tensor, cu_seqlens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_rows`: `[n, L]` per-sequence values back into the shape of `like`."""
    idx, valid = _index(cu_seqlens, rows.device)
    out = torch.zeros(like.numel(), dtype=rows.dtype, device=rows.device)
    out[idx[valid]] = rows[valid]
    return out.view(like.shape)

"""Entropy statistics of response tokens (pure tensors, no model).

    entropy_percentiles(entropy)                    # {"p50": ..., "p80": ..., "p95": ...}
    forking_token_table(token_ids, selected)        # (forking Counter, low-entropy Counter)
    top_overlap(entropy_a, entropy_b, ratio=0.2)    # share of A's top-20% positions also in B's
    entropy_summary(entropy, selected)              # fraction < 0.01, forking vs non-forking means

The paper (arXiv 2506.01939) reports for Qwen3-8B: more than half of the tokens below 0.01, the 80th
percentile at 0.672, and a 98.9% -> 86.7% overlap of the top-20% positions with the base model over
RLVR training; these functions compute the same quantities for a run.
"""
from __future__ import annotations

import math
from collections import Counter

import torch


def _valid(entropy: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    e = entropy.detach().double().reshape(-1)
    if mask is not None:
        if mask.numel() != entropy.numel():
            raise ValueError(f"mask: expected {entropy.numel()} elements like entropy, found {mask.numel()}")
        e = e[mask.reshape(-1).bool()]
    return e


def entropy_percentiles(entropy: torch.Tensor, mask: torch.Tensor | None = None,
                        qs: tuple[float, ...] = (0.5, 0.8, 0.95)) -> dict[str, float]:
    """Percentiles of the valid entropies as {"p50": ..., "p80": ..., "p95": ...}.

    Args:
        entropy: per-token entropies (any shape).
        mask: valid-token mask of the same size (None = all valid).
        qs: quantiles in [0, 1].
    """
    e = _valid(entropy, mask)
    if e.numel() == 0:
        raise ValueError("entropy_percentiles: expected at least one valid token, found none")
    values = torch.quantile(e, torch.tensor(qs, dtype=torch.float64))
    return {f"p{round(q * 100)}": float(v) for q, v in zip(qs, values)}


def topk_threshold(entropy: torch.Tensor, ratio: float, mask: torch.Tensor | None = None) -> float:
    """The k-th largest valid entropy with k = ceil(ratio * N): tokens with H >= it are the top-ratio.

    Args:
        entropy: per-token entropies.
        ratio: fraction in (0, 1].
        mask: valid-token mask (None = all valid).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio: expected a float in (0, 1], found {ratio!r}")
    e = _valid(entropy, mask)
    if e.numel() == 0:
        raise ValueError("topk_threshold: expected at least one valid token, found none")
    k = max(1, math.ceil(ratio * e.numel()))
    return float(torch.topk(e, k).values[-1])


def top_positions(entropy: torch.Tensor, ratio: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the k = ceil(ratio * N) highest valid entropies (ties broken by index)."""
    flat = entropy.detach().double().reshape(-1)
    valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    n = int(valid.sum())
    if n == 0:
        raise ValueError("top_positions: expected at least one valid token, found none")
    k = max(1, math.ceil(ratio * n))
    score = torch.where(valid, flat, torch.full_like(flat, -math.inf))
    # Stable order: sort by (-entropy, index) so equal entropies give the same answer everywhere.
    order = torch.sort(-score, stable=True).indices
    return order[:k]


def top_overlap(entropy_a: torch.Tensor, entropy_b: torch.Tensor, ratio: float = 0.2,
                mask: torch.Tensor | None = None) -> float:
    """Fraction of checkpoint A's top-ratio entropy positions that are also in B's top-ratio.

    Both tensors must score the same tokens (e.g. one set of responses re-scored by two checkpoints).

    Args:
        entropy_a: per-token entropies under checkpoint A.
        entropy_b: the same tokens' entropies under checkpoint B.
        ratio: the forking ratio rho.
        mask: valid-token mask shared by both.
    """
    if entropy_a.shape != entropy_b.shape:
        raise ValueError(f"top_overlap: expected entropies of one shape, found {tuple(entropy_a.shape)} "
                         f"and {tuple(entropy_b.shape)}")
    a = set(top_positions(entropy_a, ratio, mask).tolist())
    b = set(top_positions(entropy_b, ratio, mask).tolist())
    return len(a & b) / len(a)


# The paper's Qwen3-8B chain-of-thought figures (arXiv 2506.01939, Sec. 3), printed beside a run's.
PAPER_FRACTION_BELOW_001 = 0.5   # "more than 50%" of tokens have entropy below 0.01
PAPER_P80 = 0.672


def entropy_summary(entropy: torch.Tensor, selected: torch.Tensor | None = None) -> dict[str, float]:
    """Fraction of tokens with entropy below 0.01, and the mean entropy of forking vs other tokens.

    Args:
        entropy: per-token entropies (1-D, valid tokens only).
        selected: bool mask of the forking tokens (None: only the fraction and overall mean).

    Returns:
        {"fraction_below_0.01", "mean", "forking_mean", "non_forking_mean"} (the last two NaN
        without `selected`, or when a side is empty).
    """
    e = entropy.detach().double().reshape(-1)
    if e.numel() == 0:
        raise ValueError("entropy_summary: expected at least one token, found none")
    out = {"fraction_below_0.01": float((e < 0.01).double().mean()), "mean": float(e.mean()),
           "forking_mean": math.nan, "non_forking_mean": math.nan}
    if selected is not None:
        if selected.numel() != e.numel():
            raise ValueError(f"entropy_summary: expected {e.numel()} selected flags like entropy, found "
                             f"{selected.numel()}")
        sel = selected.reshape(-1).bool()
        if sel.any():
            out["forking_mean"] = float(e[sel].mean())
        if (~sel).any():
            out["non_forking_mean"] = float(e[~sel].mean())
    return out


def forking_token_table(token_ids: torch.Tensor, selected: torch.Tensor) -> tuple[Counter, Counter]:
    """How often each token id occurs among the selected (forking) tokens and among the rest.

    Args:
        token_ids: per-token ids (1-D).
        selected: bool mask of the same length (True = forking token).

    Returns:
        (Counter of forking-token ids, Counter of low-entropy token ids).
    """
    if token_ids.shape != selected.shape:
        raise ValueError(f"forking_token_table: expected token_ids and selected of one shape, found "
                         f"{tuple(token_ids.shape)} and {tuple(selected.shape)}")
    sel = selected.bool()
    return Counter(token_ids[sel].tolist()), Counter(token_ids[~sel].tolist())


def format_token_table(forking: Counter, low: Counter, decode, top: int = 30) -> str:
    """A two-column markdown table of the `top` most frequent forking and low-entropy tokens.

    Args:
        forking: Counter of forking-token ids.
        low: Counter of low-entropy token ids.
        decode: id -> display text.
        top: rows.
    """
    f, lo = forking.most_common(top), low.most_common(top)
    lines = ["| # | forking token | count | low-entropy token | count |", "|---|---|---|---|---|"]
    for i in range(max(len(f), len(lo))):
        a = f[i] if i < len(f) else None
        b = lo[i] if i < len(lo) else None
        lines.append(f"| {i + 1} | {repr(decode(a[0])) if a else ''} | {a[1] if a else ''} | "
                     f"{repr(decode(b[0])) if b else ''} | {b[1] if b else ''} |")
    return "\n".join(lines)

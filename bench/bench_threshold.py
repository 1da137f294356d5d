"""Benchmark (b): the exact top-20% entropy threshold on one CPU process.

    .venv/bin/python -m bench threshold        # or: make bench

N = 1M and 16M fp32 entropy-like values (60% far below 0.01, a heavy exponential tail, some
exact zeros) with a response mask that drops 10% as padding. Rows: megafork's
`topk_threshold` (C++ radix histograms, input checks included), the same radix select with the
pure-torch histograms, `torch.kthvalue` and `torch.topk` on the masked values. Every row must
return the same threshold; the median of 5 runs is reported with its ratio to kthvalue.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import median_seconds, print_table
from megafork.forking import num_forking_tokens, radix_select, topk_threshold

RATIO = 0.2
SIZES = (1 << 20, 1 << 24)


def entropy_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies shaped like Qwen3 chains of thought: most near 0, a heavy tail, some zeros."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.exp(torch.randn(n, generator=g) * 3 - 9)
    tail = torch.empty(n).exponential_(0.6, generator=g)
    h = torch.where(torch.rand(n, generator=g) < 0.6, tiny, tail)
    h[torch.rand(n, generator=g) < 0.05] = 0.0
    mask = torch.rand(n, generator=g) >= 0.1
    return h, mask


def _k_of(total: int) -> int:
    return num_forking_tokens(RATIO, total)


def _methods(h: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], float]]:
    def kthvalue() -> float:
        v = h[mask]
        return torch.kthvalue(v, v.numel() - _k_of(v.numel()) + 1).values.item()

    def topk() -> float:
        v = h[mask]
        return torch.topk(v, _k_of(v.numel()), sorted=False).values.min().item()

    return {
        "megafork C++ radix (topk_threshold)": lambda: topk_threshold(h, mask, RATIO),
        "torch-op radix twin": lambda: radix_select(h, mask, _k_of, backend="torch").value,
        "torch.kthvalue": kthvalue,
        "torch.topk": topk,
    }


def main() -> None:
    threads = torch.get_num_threads()
    rows = []
    for n in SIZES:
        methods = _methods(*entropy_like(n))
        values = {name: fn() for name, fn in methods.items()}
        if len(set(values.values())) != 1:
            raise AssertionError(f"N={n}: the methods disagree: {values}")
        times = {name: median_seconds(fn, repeats=5) for name, fn in methods.items()}
        for name, t in times.items():
            rows.append([f"{n / (1 << 20):.0f}M", name, t * 1e3, times["torch.kthvalue"] / t])
    print_table(
        f"Top-{RATIO:.0%} threshold, one CPU process ({threads} threads)",
        ["N", "method", "median ms", "speed-up vs kthvalue"],
        rows,
        note="All methods return the identical fp32 threshold (checked). Baselines include the `h[mask]` "
             "compaction they need; the radix reads the mask directly.",
    )


if __name__ == "__main__":
    main()

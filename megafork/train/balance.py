"""Balance a mini-batch's sequences over DP ranks by estimated cost.

    parts = balance_partition([cost(L) for L in lengths], dp_size, method="kk")

The cost of a sequence of L tokens is a·L + b·L² (`sequence_cost`: b > 0 counts attention's
quadratic term). Two classic multiway number-partitioning heuristics split the costs into
`dp_size` parts of near-equal sums:

* LPT (longest processing time first): largest cost to the currently lightest part;
* Karmarkar–Karp (largest differencing): keep partial k-way partitions in a max-heap keyed by
  their spread, repeatedly merge the two with the largest spread by pairing the heaviest part of
  one with the lightest of the other. Usually better than LPT when there are many items.

Both are deterministic (ties broken by index), so every rank and every resume computes the same
assignment. Which rank trains a sequence changes no number of the step: the loss normaliser is
the global token count (megatron's `calculate_per_token_loss`), so only the summation order moves.
"""
from __future__ import annotations

import heapq

METHODS = ("off", "kk", "lpt")


def sequence_cost(length: int, quadratic: float = 0.0) -> float:
    """Estimated cost of one sequence: L + quadratic·L² (a = 1)."""
    return float(length) + quadratic * float(length) ** 2


def balance_partition(costs: list[float], parts: int, method: str = "kk") -> list[list[int]]:
    """Split item indices into `parts` lists of near-equal total cost.

    Args:
        costs: non-negative cost of each item.
        parts: number of parts (DP ranks), >= 1.
        method: "kk" (Karmarkar–Karp) or "lpt".

    Returns:
        `parts` lists of item indices, each sorted ascending; part p goes to DP rank p, heaviest first.
    """
    if parts < 1:
        raise ValueError(f"balance_partition: expected parts >= 1, found {parts}")
    if method == "lpt":
        out = _lpt(costs, parts)
    elif method == "kk":
        out = _karmarkar_karp(costs, parts)
    else:
        raise ValueError(f"train.dp_balance: expected one of {METHODS[1:]}, found {method!r}")
    out = [sorted(p) for p in out]
    # Heaviest part first, ties by first index: a fixed, reproducible order of ranks.
    out.sort(key=lambda p: (-sum(costs[i] for i in p), p[0] if p else len(costs)))
    return out


def _lpt(costs: list[float], parts: int) -> list[list[int]]:
    heap = [(0.0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + costs[i], p))
    return out


def _karmarkar_karp(costs: list[float], parts: int) -> list[list[int]]:
    # Each heap entry is a k-way partial partition: parts sorted heaviest first, as (sum, items).
    heap = []
    for i, c in enumerate(costs):
        tuple_ = [(c, [i])] + [(0.0, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-c, i, tuple_))
    if not heap:
        return [[] for _ in range(parts)]
    while len(heap) > 1:
        _, key_a, a = heapq.heappop(heap)
        _, key_b, b = heapq.heappop(heap)
        # Heaviest of a with lightest of b: the differences cancel.
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda p: (-p[0], p[1][0] if p[1] else len(costs)))
        spread = merged[0][0] - merged[-1][0]
        heapq.heappush(heap, (-spread, min(key_a, key_b), merged))
    return [items for _, items in heap[0][2]]

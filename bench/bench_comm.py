"""Benchmark (c): communication of the distributed top-20% threshold over 4 gloo ranks.

    .venv/bin/python -m bench comm        # or: make bench

Both ways run for real on 4 spawned gloo ranks with uneven shards (40/30/20/10% of N):
- radix: megafork's `topk_threshold(..., group)`, two all_reduces of 2^16 int64 counts;
- all-gather: exchange the per-rank counts, all_gather the values padded to the largest shard,
  then `torch.topk` on the gathered values (what one writes without a radix select).
Bytes are counted by wrapping `torch.distributed.all_reduce` / `all_gather` on every rank, so
the table reflects the code paths, not a formula: "sent" is the tensor each rank passes in,
"received" what lands in its output buffers. Times are medians of 5 runs at one N.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch

from bench.common import print_table
from megafork.forking import num_forking_tokens
from megafork.testing.multirank import run_ranks

WORLD = 4
SHARES = (0.4, 0.3, 0.2, 0.1)
SIZES = (1 << 16, 1 << 20, 1 << 24)
TIMED_N = 1 << 22
RATIO = 0.2


def _shard(n_total: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(n_total * SHARES[rank])
    g = torch.Generator().manual_seed(rank)
    h = torch.exp(torch.randn(n, generator=g) * 3 - 6)
    return h, torch.ones(n, dtype=torch.bool)


def _allgather_threshold(h: torch.Tensor, mask: torch.Tensor, group) -> float:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    valid = h[mask]
    count = torch.tensor([valid.numel()], dtype=torch.int64)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), dtype=h.dtype)
    padded[: valid.numel()] = valid
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    values = torch.cat([o[:c] for o, c in zip(out, counts)])
    return float(torch.topk(values, num_forking_tokens(RATIO, values.numel()), sorted=False).values.min())


def _rank_fn(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from megafork.forking import topk_threshold

    group = dist.new_group(list(range(world)))
    sent: dict[str, int] = defaultdict(int)
    received: dict[str, int] = defaultdict(int)
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        sent[mode] += tensor.numel() * tensor.element_size()
        received[mode] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        sent[mode] += tensor.numel() * tensor.element_size()
        received[mode] += sum(t.numel() * t.element_size() for t in tensor_list)
        return real_all_gather(tensor_list, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    out = {"bytes": [], "times": {}}
    try:
        for n_total in SIZES:
            h, m = _shard(n_total, rank)
            sent.clear()
            received.clear()
            mode = "radix"
            tau_radix = topk_threshold(h, m, RATIO, group=group)
            mode = "allgather"
            tau_gather = _allgather_threshold(h, m, group)
            if tau_radix != tau_gather:
                raise AssertionError(f"rank {rank}, N={n_total}: radix {tau_radix} != all-gather {tau_gather}")
            out["bytes"].append((n_total, dict(sent), dict(received)))
        h, m = _shard(TIMED_N, rank)
        for mode, fn in (("radix", lambda: topk_threshold(h, m, RATIO, group=group)),
                         ("allgather", lambda: _allgather_threshold(h, m, group))):
            times = []
            for i in range(6):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                fn()
                if i:  # the first run warms up
                    times.append(time.perf_counter() - t0)
            out["times"][mode] = statistics.median(times)
    finally:
        dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather
    return out


def main() -> None:
    # One intra-op thread per rank: 4 ranks share the machine's cores.
    results = run_ranks(_rank_fn, WORLD, timeout=600)
    rows = []
    for i, n_total in enumerate(SIZES):
        per_rank = [r["bytes"][i] for r in results]
        radix_sent = max(b[1]["radix"] for b in per_rank)
        gather_sent = max(b[1]["allgather"] for b in per_rank)
        gather_recv = max(b[2]["allgather"] for b in per_rank)
        rows.append([f"{n_total:,}", f"{radix_sent:,}", f"{gather_sent:,}", f"{gather_recv:,}",
                     gather_recv / radix_sent])
    print_table(
        f"Threshold communication over {WORLD} gloo ranks (shards {SHARES} of N), bytes per rank",
        ["N total", "radix all_reduce payload", "all-gather sent", "all-gather received", "received / radix"],
        rows,
        note="radix = 2 x 65,536 x 8 bytes whatever N is; the all-gather pads every shard to the largest "
             "(40% of N) and each rank receives all 4 padded shards. Counted by wrapping the collectives.",
    )
    radix_t = max(r["times"]["radix"] for r in results)
    gather_t = max(r["times"]["allgather"] for r in results)
    print_table(
        f"Threshold wall time over {WORLD} gloo ranks, N = {TIMED_N:,} (slowest rank's median of 5)",
        ["method", "median ms", "speed-up vs all-gather"],
        [["radix (topk_threshold)", radix_t * 1e3, gather_t / radix_t],
         ["all-gather + torch.topk", gather_t * 1e3, 1.0]],
    )


if __name__ == "__main__":
    main()

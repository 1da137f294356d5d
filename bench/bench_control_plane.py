"""Benchmark: handing a step's DP shares from rank 0 to every rank over gloo (the control plane).

    .venv/bin/python -m bench control_plane        # or: make bench

Both ways run for real on spawned gloo ranks (DP = world, TP = 1), on a step of 16 responses per
prompt group with lengths uniform in [1, 4000] tokens (int32 ids + float32 log-probs, one prompt
tensor per group, as `collect_rollouts` builds them):
- pickled shares (the previous ControlPlane): rank 0 pickles each DP share (tensors as numpy
  buffers, protocol 5), sends them all with isend, and decodes its own;
- megafork: `ControlPlane.distribute`, the columnar wire form of `megafork.train.wire` in chunks
  of at most 16 MiB, rank 0's own share kept as it is.
"rank-0 B/token" is the trajectories' bytes plus the peak of what `tracemalloc` sees allocated on
rank 0 during the call (numpy and Python buffers, where both ways put their wire bytes), over the
step's generated tokens; the issue's target is 16. Times are medians of 3 calls.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import statistics
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import torch

from bench.common import print_table
from megafork.testing.multirank import run_ranks

N = 16
GROUPS_PER_RANK = 6
REPEATS = 3


def _step(world: int) -> list:
    from megafork.train.batch import Trajectory
    from megafork.train.shard import split_for_dp

    g = torch.Generator().manual_seed(0)
    trajs = []
    for k in range(GROUPS_PER_RANK * world):
        prompt = torch.randint(0, 151936, (200,), generator=g, dtype=torch.int32)
        for _ in range(N):
            n = int(torch.randint(1, 4001, (), generator=g))
            trajs.append(Trajectory(prompt_ids=prompt, response_ids=torch.randint(0, 151936, (n,), generator=g,
                                                                                   dtype=torch.int32),
                                    rollout_logprobs=-torch.rand(n, generator=g), reward=1.0, accuracy=1.0,
                                    advantage=0.5, group=k, weight_version=3))
    return split_for_dp(trajs, N, world, world)


def _pickle(obj) -> torch.Tensor:
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=5)
    p.dispatch_table = copyreg.dispatch_table.copy()
    p.dispatch_table[torch.Tensor] = lambda t: (torch.from_numpy, (t.detach().numpy(),))
    p.dump(obj)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _pickled_distribute(payload, shares, world_size: int):
    """The previous ControlPlane's transfer (TP = 1: every rank leads its replica)."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, src=0)
        blob = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(blob, src=0)
        return pickle.loads(np.asarray(blob.numpy()).tobytes())
    works, keep, own = [], [], None
    for dp in range(world_size):
        data = _pickle((payload, shares[dp]))
        if dp == 0:
            own = data
            continue
        size = torch.tensor([data.numel()], dtype=torch.int64)
        keep += [size, data]
        works += [dist.isend(size, dst=dp), dist.isend(data, dst=dp)]
    for w in works:
        w.wait()
    return pickle.loads(np.asarray(own.numpy()).tobytes())


def _rank_fn(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from megafork.train.control import ControlPlane

    control = ControlPlane(SimpleNamespace(rank=rank, dp_rank=rank), timeout_minutes=10.0)
    shares = _step(world) if rank == 0 else None
    ways = {"pickled shares": lambda: _pickled_distribute({"step": 1}, shares, world),
            "megafork": lambda: control.distribute({"step": 1}, shares)}
    out = {}
    for name, fn in ways.items():
        times, peaks = [], []
        for _ in range(REPEATS):
            dist.barrier()
            if rank == 0:
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times.append(time.perf_counter() - t0)
            if rank == 0:
                peaks.append(tracemalloc.get_traced_memory()[1] - base)
                tracemalloc.stop()
        out[name] = (statistics.median(times), max(peaks) if peaks else 0)
    if rank == 0:
        flat = [t for s in shares for m in s for t in m]
        out["tokens"] = sum(t.response_ids.numel() for t in flat)
        out["stored"] = sum(t.response_ids.nbytes + t.rollout_logprobs.nbytes for t in flat) + sum(
            {id(t.prompt_ids): t.prompt_ids.nbytes for t in flat}.values())
    control.close()
    return out


def main() -> None:
    rows = []
    for world in (2, 4):
        r = run_ranks(_rank_fn, world, timeout=900)[0]
        (t_old, p_old), (t_new, p_new) = r["pickled shares"], r["megafork"]
        per_old, per_new = (r["stored"] + p_old) / r["tokens"], (r["stored"] + p_new) / r["tokens"]
        rows.append([world, f"{r['tokens']:,}", f"{t_old:.3f}", f"{t_new:.3f}", f"{t_new / t_old:.2f}",
                     f"{per_old:.2f}", f"{per_new:.2f}", f"{per_new / per_old:.2f}"])
    print_table("control plane: a step's DP shares from rank 0 over gloo (DP = world, TP = 1)",
                ["ranks", "tokens", "pickled s", "megafork s", "time ratio", "pickled rank-0 B/token",
                 "megafork rank-0 B/token", "B/token ratio"], rows,
                note="ratios are megafork / pickled (lower is better); rank-0 B/token includes the 8 B/token "
                     "the trajectories themselves hold; target <= 16")


if __name__ == "__main__":
    main()

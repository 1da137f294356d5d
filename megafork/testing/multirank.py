"""Run a function on N gloo ranks in spawned processes.

    from megafork.testing import run_ranks
    results = run_ranks(fn, world_size=2, args=(x,), timeout=120)

`fn(rank, world_size, *args)` runs in a fresh process with torch.distributed initialised
(gloo, a free loopback port). The ranks run on CPU even where CUDA is visible (the harness
hides the GPUs from them), unless `device="cuda"` asks for the ranks to share the visible GPUs. It must be importable by name (a module-level function). The
return values come back in rank order. A failure on any rank raises `RankFailure` carrying
that rank's traceback; a hang raises it after `timeout` seconds and kills every rank, so a
broken collective can never block CI.
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A rank raised, died or hung."""


def free_port() -> int:
    """Return a TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _environ(overrides: dict[str, str]) -> Iterator[None]:
    """Set environment variables while child processes start (spawn copies os.environ then)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _device_env(device: str) -> dict[str, str]:
    """What the ranks' environment must say for `device`, fixed before any rank starts.

    "cpu" hides every GPU: CUDA_VISIBLE_DEVICES must be set before the child first touches CUDA,
    which may happen while it unpickles `fn` (importing a test module that asks
    `torch.cuda.is_available()`), so it is set in the parent around `Process.start()`.
    """
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("run_ranks(device='cuda'): no CUDA device is visible")
        return {}
    raise ValueError(f"run_ranks: device expected 'cpu' or 'cuda', found {device!r}")


def _local_rank(rank: int, device: str) -> int:
    """LOCAL_RANK of a rank: its index on CPU; on CUDA, a visible GPU (ranks share them round-robin)."""
    if device == "cuda":
        import torch

        return rank % torch.cuda.device_count()
    return rank


def _worker(fn, rank, world_size, port, args, kwargs, init_pg, results, device="cpu"):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(_local_rank(rank, device)), LOCAL_WORLD_SIZE=str(world_size),
        # Two cores shared by up to four ranks: one intra-op thread each avoids oversubscription.
        OMP_NUM_THREADS=os.environ.get("MEGAFORK_TEST_THREADS", "1"),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args, **kwargs)
        try:
            payload = pickle.dumps(out)
        except Exception as exc:  # noqa: BLE001 - report what could not travel
            raise TypeError(f"rank {rank}: return value of {fn.__name__} is not picklable: {exc}") from exc
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a failure
                pass


def run_ranks(*args, port_retries: int = 3, **kwargs) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned gloo ranks.

    See `_run_ranks_once` for the arguments. The rendezvous port is picked free and then bound
    by rank 0's TCPStore a moment later; if another process takes it in between (EADDRINUSE),
    the whole run is retried on a new port, up to `port_retries` times. Any other failure is
    raised at once.
    """
    for attempt in range(port_retries + 1):
        try:
            return _run_ranks_once(*args, **kwargs)
        except RankFailure as e:
            if "EADDRINUSE" not in str(e) or attempt == port_retries:
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 180.0,
    init_process_group: bool = True,
    device: str = "cpu",
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` spawned gloo ranks.

    Args:
        fn: module-level function; its return value must be picklable.
        world_size: number of ranks (processes).
        args: extra positional arguments, pickled to every rank.
        kwargs: extra keyword arguments.
        timeout: seconds for the whole run before every rank is killed.
        init_process_group: if False, the ranks get MASTER_ADDR/PORT but no default group
            (for code under test that initialises torch.distributed itself).
        device: "cpu" (default): the ranks see no GPU (CUDA_VISIBLE_DEVICES=""), so megafork
            runs them on CPU with gloo even on a GPU machine. "cuda": the ranks keep the visible
            GPUs and share them round-robin (LOCAL_RANK = rank % device count); the default
            group is still gloo, which lets several ranks use one GPU (NCCL refuses that).

    Returns:
        The per-rank return values, in rank order.

    Raises:
        RankFailure: naming each failing rank with its traceback, or the ranks still running
            when the timeout expired.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, daemon=False,
                    args=(fn, r, world_size, port, args, kwargs or {}, init_process_group, results, device))
        for r in range(world_size)
    ]
    with _environ(_device_env(device)):
        for p in procs:
            p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                failed = _format_failures(outcomes)
                raise RankFailure(f"{fn.__name__}: ranks {missing} still running after {timeout:.0f}s (hang?)"
                                  + (f"; failures first:\n{failed}" if failed else ""))
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
                outcomes[rank] = (ok, payload)
                if not ok:
                    # Give the peers a moment to report their own errors, then stop waiting:
                    # they are usually blocked in a collective with the dead rank.
                    _drain(results, outcomes, world_size, grace=3.0)
                    raise RankFailure(f"{fn.__name__} failed on {world_size} ranks:\n{_format_failures(outcomes)}")
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    _drain(results, outcomes, world_size, grace=1.0)
                    codes = {r: procs[r].exitcode for r in dead if r not in outcomes}
                    if codes:
                        raise RankFailure(f"{fn.__name__}: ranks died without reporting, exit codes {codes}\n"
                                          + _format_failures(outcomes)) from None
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5.0 if len(outcomes) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


def _drain(results, outcomes, world_size, grace):
    end = time.monotonic() + grace
    while len(outcomes) < world_size and time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=max(0.01, end - time.monotonic()))
            outcomes[rank] = (ok, payload)
        except queue.Empty:
            break


def _format_failures(outcomes) -> str:
    return "\n".join(f"--- rank {r} ---\n{payload}" for r, (ok, payload) in sorted(outcomes.items()) if not ok)

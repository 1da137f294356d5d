"""Weight-sync throughput into `megafork serve` over gloo on loopback, against a raw broadcast.

    .venv/bin/python -m bench weight_sync

A Qwen3-shaped model of about 110M parameters (bf16, 224 MB) is served by `megafork serve` in a
subprocess. The whole sync path (bucketing, packing, HTTP metadata, broadcast, the server's
validation and load into its weights) is timed against a raw `broadcast` of the same bytes, in
the same pieces (per tensor or per bucket), from a preallocated buffer to a process that only
receives into one. Both use the same kind of process group (gloo, loopback) in the same run,
interleaved run by run. Medians of 5 runs.

BENCH_SERVE_LOG=INFO shows the server's receive/load time per update; BENCH_SERVE_ARGS passes
extra `megafork serve` flags (e.g. "--threads 1").
"""
from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import print_table

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, tie_word_embeddings=False, max_position_embeddings=512)
REPEATS = 5


def _raw_receiver(port: int, max_bytes: int, jobs) -> None:
    from megafork.rollout.process_group import destroy_weight_update_group, init_weight_update_group

    torch.set_num_threads(1)
    pg = init_weight_update_group("127.0.0.1", port, 1, 2, "raw", "gloo", 300)
    buf = torch.empty(max_bytes, dtype=torch.uint8)
    while (sizes := jobs.get()) is not None:
        _broadcast_all(buf, sizes, pg)
    destroy_weight_update_group(pg)


def _broadcast_all(buf: torch.Tensor, sizes: list[int], pg) -> None:
    """One broadcast per piece, all in flight at once (as the sync path issues them)."""
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    works = [dist.broadcast(buf[a:b], group_src=0, group=pg, async_op=True) for a, b in zip(offsets, offsets[1:])]
    for w in works:
        w.wait()


class RawBroadcast:
    """Rank 0 of a 2-process gloo group whose peer only receives into a preallocated buffer."""

    def __init__(self, max_bytes: int):
        from megafork.rollout.process_group import init_weight_update_group
        from megafork.testing.multirank import free_port

        ctx = mp.get_context("spawn")
        self.jobs = ctx.Queue()
        port = free_port()
        self.proc = ctx.Process(target=_raw_receiver, args=(port, max_bytes, self.jobs))
        self.proc.start()
        self.pg = init_weight_update_group("127.0.0.1", port, 0, 2, "raw", "gloo", 300)
        self.buf = torch.randint(0, 255, (max_bytes,), dtype=torch.uint8)

    def run(self, sizes: list[int]) -> float:
        self.jobs.put(sizes)
        t0 = time.perf_counter()
        _broadcast_all(self.buf, sizes, self.pg)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(60)
        dist.destroy_process_group(self.pg)


def main() -> None:
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    logging.getLogger("megafork.rollout.weight_sync").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_wsync_") as tmp:
        _run(make_tiny_qwen3(os.path.join(tmp, "m"), init_std=0.02, **SHAPE))


def _run(hf_dir) -> None:
    from safetensors.torch import load_file

    from megafork.rollout import HttpWeightSender, WeightSyncConfig, launch_servers, stop_servers
    from megafork.rollout.buckets import iter_buckets
    from megafork.testing.multirank import free_port

    tensors = [(n, t.to(torch.bfloat16).contiguous()) for n, t in load_file(str(hf_dir / "model.safetensors")).items()]
    params = sum(t.numel() for _, t in tensors)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork", "serve", "--model", str(hf_dir), "--port", str(port), "--device", "cpu",
           "--dtype", "bfloat16", *os.environ.get("BENCH_SERVE_ARGS", "").split(), "--log-level", os.environ.get("BENCH_SERVE_LOG", "WARNING")]
    procs = launch_servers([cmd], [url], timeout_s=300)
    raw = RawBroadcast(nbytes)
    rows = []
    try:
        for label, cfg in [
            ("auto = per_tensor on gloo, 512 MiB (default)", WeightSyncConfig()),
            ("flattened_bucket, 512 MiB", WeightSyncConfig(load_format="flattened_bucket", group_name="flat")),
            ("flattened_bucket, 64 MiB", WeightSyncConfig(load_format="flattened_bucket", bucket_bytes=64 << 20,
                                                          group_name="flat64")),
        ]:
            buckets = [[t for _, t in b] for b in iter_buckets(tensors, cfg.bucket_bytes)]
            # The raw baseline sends what the chosen format puts on the wire: one broadcast per
            # tensor, or one per bucket.
            if cfg.resolved_load_format() == "per_tensor":
                sizes = [t.numel() * t.element_size() for b in buckets for t in b]
            else:
                sizes = [sum(t.numel() * t.element_size() for t in b) for b in buckets]
            sender = HttpWeightSender([url], cfg)
            sender.connect()
            raw_t, sync_t = [], []
            for rep in range(REPEATS + 1):  # interleaved, so both see the same machine load
                r = raw.run(sizes)
                t0 = time.perf_counter()
                sender.send(iter(tensors), weight_version="bench")
                if rep:
                    raw_t.append(r)
                    sync_t.append(time.perf_counter() - t0)
            sender.close()
            r, y = statistics.median(raw_t), statistics.median(sync_t)
            rows.append([label, len(buckets), len(sizes), f"{r * 1e3:.0f} ms", f"{nbytes / r / 1e9:.2f}",
                         f"{y * 1e3:.0f} ms", f"{nbytes / y / 1e9:.2f}", r / y])
    finally:
        raw.close()
        stop_servers(procs)
    print_table(
        f"Weight sync into megafork serve: {params / 1e6:.0f}M params, bf16, {nbytes / 1e6:.0f} MB, gloo loopback",
        ["sync format", "buckets", "broadcasts", "raw broadcast", "raw GB/s", "megafork sync", "sync GB/s",
         "sync / raw throughput"],
        rows,
        note=f"Target: >= 0.8x raw. {os.cpu_count()} CPU cores; torch {torch.__version__}; "
             f"measured {time.strftime('%Y-%m-%d')}.",
    )


if __name__ == "__main__":
    main()

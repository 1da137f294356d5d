"""Weight-sync throughput into `megafork serve` over gloo on loopback, against a raw broadcast.

    .venv/bin/python -m bench weight_sync

A Qwen3-shaped model of about 100M parameters (bf16, 216 MB) is served by `megafork serve` in a
subprocess. The whole sync path (bucketing, packing, HTTP metadata, broadcast, the server's
validation and copy into its weights) is timed against a raw `broadcast` of the same bytes, in
the same bucket sizes, from preallocated buffers to a process that only receives. Both use the
same kind of process group (gloo, loopback) in the same run. Medians of 5 runs.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import median_seconds, print_table

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, tie_word_embeddings=False, max_position_embeddings=512)
REPEATS = 5


def _raw_receiver(port: int, sizes: list[int], runs: int) -> None:
    from megafork.rollout.process_group import destroy_weight_update_group, init_weight_update_group

    torch.set_num_threads(1)
    pg = init_weight_update_group("127.0.0.1", port, 1, 2, "raw", "gloo", 300)
    bufs = [torch.empty(s, dtype=torch.uint8) for s in sizes]
    for _ in range(runs):
        for b in bufs:
            dist.broadcast(b, group_src=0, group=pg)
    destroy_weight_update_group(pg)


def _raw_sender(sizes: list[int]):
    from megafork.rollout.process_group import init_weight_update_group
    from megafork.testing.multirank import free_port

    port = free_port()
    runs = REPEATS + 1
    proc = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, sizes, runs))
    proc.start()
    pg = init_weight_update_group("127.0.0.1", port, 0, 2, "raw", "gloo", 300)
    bufs = [torch.randint(0, 255, (s,), dtype=torch.uint8) for s in sizes]

    def once():
        for b in bufs:
            dist.broadcast(b, group_src=0, group=pg)

    seconds = median_seconds(once, repeats=REPEATS, warmup=1)
    proc.join(60)
    dist.destroy_process_group(pg)
    return seconds


def main() -> None:
    from megafork.rollout import HttpWeightSender, WeightSyncConfig, launch_servers, stop_servers
    from megafork.rollout.buckets import iter_buckets
    from megafork.testing.multirank import free_port
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    logging.getLogger("megafork.rollout.weight_sync").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_wsync_")
    hf_dir = make_tiny_qwen3(os.path.join(tmp, "m"), init_std=0.02, **SHAPE)
    from safetensors.torch import load_file

    tensors = [(n, t.to(torch.bfloat16).contiguous()) for n, t in load_file(str(hf_dir / "model.safetensors")).items()]
    params = sum(t.numel() for _, t in tensors)
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork", "serve", "--model", str(hf_dir), "--port", str(port), "--device", "cpu",
           "--dtype", "bfloat16", *os.environ.get("BENCH_SERVE_ARGS", "").split(), "--log-level", os.environ.get("BENCH_SERVE_LOG", "WARNING")]
    procs = launch_servers([cmd], [url], timeout_s=300)
    rows = []
    try:
        for label, cfg in [
            ("flattened_bucket, 512 MiB (default)", WeightSyncConfig()),
            ("flattened_bucket, 64 MiB", WeightSyncConfig(bucket_bytes=64 << 20, group_name="b64")),
            ("per_tensor, 512 MiB", WeightSyncConfig(load_format="per_tensor", group_name="pt")),
        ]:
            sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_buckets(tensors, cfg.bucket_bytes)]
            raw = _raw_sender(sizes)
            sender = HttpWeightSender([url], cfg)
            sender.connect()
            sync = median_seconds(lambda s=sender: s.send(iter(tensors), weight_version="bench"), repeats=REPEATS)
            sender.close()
            rows.append([label, len(sizes), f"{raw * 1e3:.0f} ms", f"{nbytes / raw / 1e9:.2f}",
                         f"{sync * 1e3:.0f} ms", f"{nbytes / sync / 1e9:.2f}", raw / sync])
    finally:
        stop_servers(procs)
    print_table(
        f"Weight sync into megafork serve: {params / 1e6:.0f}M params, bf16, {nbytes / 1e6:.0f} MB, gloo loopback",
        ["sync format", "buckets", "raw broadcast", "raw GB/s", "megafork sync", "sync GB/s", "sync / raw throughput"],
        rows,
        note=f"Target: >= 0.8x raw. {os.cpu_count()} CPU cores; torch {torch.__version__}; "
             f"measured {time.strftime('%Y-%m-%d')}.",
    )


if __name__ == "__main__":
    main()

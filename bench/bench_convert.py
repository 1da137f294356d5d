"""HF -> megatron conversion throughput (GB/s of HF weights) and peak RSS, at TP=1 and TP=2.

    .venv/bin/python -m bench convert

A random ~100M-parameter Qwen3 (fp32, 400 MB) is written once; each run converts it with
`megafork convert hf-to-megatron` in fresh processes (torchrun-style ranks spawned by
run_ranks). The naive way, for comparison, is what most scripts do: load the whole HF model
with transformers on every rank, then copy the shards out of its state dict.
"""
from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import print_table

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)


def _convert(rank, world, hf_dir, out_dir, tp, naive):
    import torch

    from megafork.models.qwen3.cli import main

    if naive:
        from transformers import Qwen3ForCausalLM

        full = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()  # noqa: F841
    code = main(["hf-to-megatron", "--hf-dir", hf_dir, "--out-dir", out_dir, "--tp", str(tp), "--dtype", "fp32"])
    assert code == 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB


def main() -> None:
    from megafork.testing import run_ranks
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    root = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf_dir = make_tiny_qwen3(root / "hf", init_std=0.02, **SHAPE)
        nbytes = (hf_dir / "model.safetensors").stat().st_size
        rows = []
        for tp in (1, 2):
            for naive in (False, True):
                times, rss = [], []
                for i in range(5):
                    out = root / f"ckpt_{tp}_{naive}_{i}"
                    t0 = time.perf_counter()
                    per_rank = run_ranks(_convert, tp, args=(str(hf_dir), str(out), tp, naive),
                                         init_process_group=False, timeout=600)
                    times.append(time.perf_counter() - t0)
                    rss.append(max(per_rank))
                    shutil.rmtree(out)
                times.sort()
                med = times[len(times) // 2]
                rows.append([tp, "naive (transformers load + copy)" if naive else "megafork (streamed slices)",
                             f"{nbytes / med / 1e9:.3f}", f"{med:.2f}", f"{max(rss):.0f}"])
        print_table(f"HF -> megatron conversion, {nbytes / 1e6:.0f} MB fp32 Qwen3 (~{nbytes / 4e6:.0f}M params), "
                    "median of 5, wall time incl. process start",
                    ["TP", "method", "GB/s", "seconds", "peak RSS per rank (MiB)"], rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

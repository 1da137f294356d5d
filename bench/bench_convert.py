"""HF -> megatron conversion throughput (GB/s of HF weights) and peak RSS, at TP=1 and TP=2.

    .venv/bin/python -m bench convert

A random ~100M-parameter Qwen3 (fp32 safetensors, ~400 MB) is written once. For each TP size
one `run_ranks` call spawns the ranks; each rank initialises megatron parallel state and builds
the model once, then times, in that warm process, interleaved over the repeats:

- megafork: `load_hf_weights` (every rank reads only its own slices with `get_slice`), then
  `save_megatron_checkpoint` (dist_checkpointing) into a fresh directory.
- naive: what conversion scripts usually do: every rank loads the whole state dict with
  `safetensors.torch.load_file` and copies its TP shards out of it with the same mapping
  (`mapping.read_shard` over the full tensors). Two flavours: backend="pread" holds the whole
  checkpoint in memory (the baseline: an in-memory copy of every tensor, as `torch.load`
  gives); the default lazy mmap of safetensors >= 0.8 only pages in what is read.
  Their save step would be the same `save_megatron_checkpoint`, so their end-to-end time
  reuses the measured save time.

Before timing, each rank checks once that every variant fills every parameter with exactly
the same values (parameters are NaN-filled before each variant, so a missed one fails).
"""
from __future__ import annotations

import ctypes
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import print_table

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
REPEATS = 5


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no {field} line (needs Linux)")


def _settle() -> None:
    """Free what the last variant dropped, so it does not hide the next one's growth."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measured(fn, barrier) -> tuple[float, float]:
    """(wall seconds across all ranks, this rank's peak RSS increase in MiB) of `fn()`."""
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    seconds = time.perf_counter() - t0
    return seconds, (_rss_kib("VmHWM") - before) / 1024


def _naive_load(model, hf_dir: str, groups, backend: str) -> None:
    """Every rank loads the whole checkpoint with `load_file`, then copies out its TP shards.

    Args:
        backend: safetensors' `load_file` backend. "pread" reads every tensor into memory (as
            `torch.load` does); "mmap"
            (0.8's default) returns copy-on-write views of the file, paged in as they are read.
    """
    import torch
    from safetensors.torch import load_file

    from megafork.models.qwen3.hf_io import HFCheckpoint, stage_rules
    from megafork.models.qwen3.mapping import megatron_name, read_shard

    ckpt = HFCheckpoint(hf_dir)
    files = sorted(set(ckpt.weight_map.values()))
    ckpt.close()
    full: dict[str, torch.Tensor] = {}
    for f in files:
        full.update(load_file(str(Path(hf_dir) / f), backend=backend))

    def read(name, dim, start, stop):
        t = full[name]
        return t[start:stop] if dim == 0 else t[:, start:stop]

    params = dict(model.named_parameters())
    with torch.no_grad():
        for rule, local, global_layer in stage_rules(model, groups.pp_rank, groups.pp_size):
            shard = read_shard(rule, global_layer, model.hf_config, groups.tp_rank, groups.tp_size,
                               model.vocab_size, read)
            params[megatron_name(rule, local)].copy_(shard)


# Variant name -> label in the table; "megafork" is load_hf_weights (+ the timed save).
VARIANTS = {
    "megafork": "megafork (get_slice per rank)",
    "pread": "naive: load_file(backend='pread') + copy",
    "mmap": "naive: load_file() [lazy mmap] + copy",
}
BASELINE = "pread"


def _rank(rank: int, world: int, hf_dir: str, work_dir: str, tp: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights, read_hf_config
    from megafork.models.qwen3.checkpoint import save_megatron_checkpoint

    groups = init_distributed(ParallelConfig(tp=tp))
    opts = Qwen3BuildOptions(dtype="fp32", perform_initialization=False)
    model = build_qwen3(read_hf_config(hf_dir), opts, groups)
    params = dict(model.named_parameters())

    def fill_nan():
        with torch.no_grad():
            for p in params.values():
                p.fill_(float("nan"))

    # Correctness (and warm-up: faults in the parameters' pages and the file's page cache).
    fill_nan()
    load_hf_weights(model, hf_dir, groups)
    ref = {k: p.detach().clone() for k, p in params.items()}
    for backend in ("pread", "mmap"):
        fill_nan()
        _naive_load(model, hf_dir, groups, backend)
        for k, p in params.items():
            if not torch.equal(p, ref[k]):
                bad = (p != ref[k]).sum().item()
                raise AssertionError(f"rank {rank} (tp={tp}): parameter {k}: naive {backend} copy differs from "
                                     f"load_hf_weights in {bad} of {p.numel()} elements (NaN = never written)")
    del ref

    out: dict[str, list[float]] = {f"{v}_{m}": [] for v in (*VARIANTS, "save") for m in ("s", "mib")}

    def record(variant, fn):
        s, mib = _measured(fn, dist.barrier)
        out[f"{variant}_s"].append(s)
        out[f"{variant}_mib"].append(mib)

    names = list(VARIANTS)
    for i in range(repeats):
        ckpt = Path(work_dir) / f"tp{tp}_{i}"
        # Rotate the order so page-cache or allocator state favours no variant.
        for variant in names[i % 3:] + names[:i % 3]:
            if variant == "megafork":
                record("megafork", lambda: load_hf_weights(model, hf_dir, groups))
                record("save", lambda ckpt=ckpt: save_megatron_checkpoint(model, ckpt, groups, opts, hf_dir=hf_dir))
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(ckpt)
            else:
                record(variant, lambda variant=variant: _naive_load(model, hf_dir, groups, variant))
    return out


def main() -> None:
    from megafork.testing import run_ranks
    from megafork.testing.tiny_qwen3 import make_tiny_qwen3

    root = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf_dir = make_tiny_qwen3(root / "hf", init_std=0.02, **SHAPE)
        nbytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        gb = nbytes / 1e9
        rows, saves = [], []
        for tp in (1, 2):
            per_rank = run_ranks(_rank, tp, args=(str(hf_dir), str(root), tp, REPEATS), timeout=600)
            sec = {k[:-2]: statistics.median(v) for k, v in per_rank[0].items() if k.endswith("_s")}
            # Peak RSS: median over repeats of each rank's increase, then the max over ranks.
            mib = {k[:-4]: max(statistics.median(r[k]) for r in per_rank) for k in per_rank[0] if k.endswith("_mib")}
            saves.append(f"TP={tp}: {sec['save']:.2f} s, +{mib['save']:.0f} MiB")
            base_e2e = sec[BASELINE] + sec["save"]
            for variant, label in VARIANTS.items():
                e2e = sec[variant] + sec["save"]
                rows.append([tp, label, f"{sec[variant]:.3f}", f"{gb / sec[variant]:.2f}", f"{e2e:.2f}",
                             f"{gb / e2e:.3f}", f"{mib[variant]:.0f}", f"{sec[BASELINE] / sec[variant]:.2f}x",
                             f"{base_e2e / e2e:.2f}x", f"{mib[variant] / mib[BASELINE]:.2f}x"])
        print_table(
            f"HF -> megatron conversion, {nbytes / 1e6:.0f} MB fp32 Qwen3 (~{nbytes / 4e6:.0f}M params), "
            f"warm ranks, median of {REPEATS}",
            ["TP", "method", "load s", "load GB/s", "e2e s", "e2e GB/s", "peak RSS incr. load (MiB)",
             "load speed vs pread", "e2e speed vs pread", "RSS vs pread"],
            rows,
            note=("GB/s = HF checkpoint bytes / wall seconds over all ranks (barrier to barrier); page cache warm, "
                  "1 intra-op thread per rank, gloo on CPU. e2e = load + save_megatron_checkpoint "
                  "(dist_checkpointing, fresh directory), timed after the megafork load; the naive rows reuse "
                  f"that save time (same step). Save: {'; '.join(saves)}. Peak RSS increase = VmHWM after the "
                  "step minus VmRSS before it, VmHWM reset via /proc/self/clear_refs=5 after gc + malloc_trim; "
                  "median over repeats, max over ranks; parameters already resident. It counts mapped pages of "
                  "the safetensors file (file-backed, reclaimable) as well as anonymous memory, which is why the "
                  "lazy-mmap load_file (safetensors >= 0.8 default) matches megafork. Before timing, every variant "
                  "is checked to write bit-identical parameters (NaN-filled first, so a missed one fails)."),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

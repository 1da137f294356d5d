"""`megafork plan`: per-GPU memory of a training config on every pipeline stage, before any GPU is touched.

    megafork plan --config examples/configs/qwen3_32b.yaml --gpus 64 model.hf_path=/ckpt/Qwen3-32B
    megafork plan --config X.yaml --gpu-mem-gb 80 --json model.hf_path=DIR parallel.tp=8

The config resolves exactly as for `megafork train` (same errors); only `config.json` in
`model.hf_path` is read. Exit code: 0 when every stage fits within the margin, 1 when one does
not (the table names the cheapest knob that would make it fit), 2 on a bad config.
"""
from __future__ import annotations

import argparse
import json
import sys

from megafork.train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megafork plan", description="per-GPU memory of a config, stage by stage")
    p.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs of the run; DP = gpus / (tp*pp*cp) (default: one model replica, DP = 1)")
    p.add_argument("--margin", type=float, default=0.85, help="fraction of the GPU a stage may use (default 0.85)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=8")
    args = p.parse_intermixed_args(argv)
    from megafork.models.qwen3 import read_hf_config
    from megafork.plan.memory import plan_memory

    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.model.hf_path:
            raise ConfigError("model.hf_path: expected a directory holding the model's config.json, found ''")
        hf = read_hf_config(cfg.model.hf_path)
        plan = plan_memory(cfg, hf, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gb, margin=args.margin)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        p.exit(2, f"megafork plan: {e}\n")
    print(json.dumps(plan.json()) if args.json else format_plan(plan, cfg, hf))
    return 0 if plan.fits else 1


def format_plan(plan, cfg, hf) -> str:
    """The human-readable table: one row per stage, the verdict and any fix."""
    par, m = cfg.parallel, cfg.model
    rc = m.recompute if m.recompute != "full" else f"full/{m.recompute_method}/{m.recompute_num_layers}"
    if m.recompute == "selective":
        rc += "(" + ",".join(m.recompute_modules) + ")"
    lines = [
        f"model {hf.num_hidden_layers} layers, hidden {hf.hidden_size}; TP={par.tp} PP={par.pp} DP={plan.dp} "
        f"({plan.gpus} GPUs); SP={'on' if par.sequence_parallel else 'off'}; recompute={rc}; "
        f"distributed optimizer={'on' if cfg.optim.distributed_optimizer else 'off'}; "
        f"{m.transformer_impl} spec; worst micro-batch {plan.tokens} tokens",
        "",
        "| stage | params/GPU | weights | grads | optimizer | activations (in flight) | head ws | resident mbs | "
        "allowance | total GiB | of GPU | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    limit = plan.margin * plan.gpu_mem_gib
    for s in plan.stages:
        verdict = "fits" if s.total_gib <= limit else f"DOES NOT FIT: {plan.fixes.get(s.stage, '')}"
        lines.append(f"| {s.stage} | {s.params:,} | {s.weights_gib:.2f} | {s.grads_gib:.2f} | {s.optimizer_gib:.2f} | "
                     f"{s.activations_gib:.2f} ({s.in_flight}) | {s.head_workspace_gib:.2f} | {s.resident_gib:.2f} | "
                     f"{s.allowance_gib:.2f} | {s.total_gib:.2f} | {100 * s.total_gib / plan.gpu_mem_gib:.0f}% | "
                     f"{verdict} |")
    lines.append("")
    lines.append(f"{'FITS' if plan.fits else 'DOES NOT FIT'}: limit {plan.margin:.0%} of {plan.gpu_mem_gib:g} GiB = "
                 f"{limit:.1f} GiB per GPU (allowance: 2.5 GiB CUDA context + NCCL, 5% fragmentation)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The CPU demo (`make demo`): a tiny Qwen3 learns 2-digit sums with DAPO on its forking tokens.

    make demo                                   # = .venv/bin/python -m megafork.demo
    .venv/bin/python -m megafork.demo --fresh   # redo the warm start even if runs/tiny_cpu has one
    .venv/bin/python -m megafork.demo ablation  # the token ablation, 3 seeds per row (megafork.demo.ablation)

1. `megafork.demo.prepare`: writes a tiny Qwen3 with a task tokenizer (HF format) and warm-starts
   it with a short supervised phase to a partial held-out accuracy.
2. `torchrun --nproc_per_node=2 -m megafork train --config examples/configs/tiny_cpu.yaml`: the
   real trainer (megatron-core model, data parallel over 2 gloo ranks, fused head, exact forking selection,
   embedded rollout engine with weight sync every step).
3. `megafork analyze runs/tiny_cpu`: the plots.

It prints the held-out accuracy before and after RL and where the plots are;
`runs/tiny_cpu/summary.json` holds initial_accuracy, final_accuracy, steps and wall_seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "examples/configs/tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ablation"]:
        from megafork.demo.ablation import main as ablation_main

        return ablation_main(argv[1:])
    p = argparse.ArgumentParser(prog="megafork.demo", description=__doc__.splitlines()[0])
    p.add_argument("--fresh", action="store_true", help="redo the warm start even if one exists")
    p.add_argument("--nproc", type=int, default=2, help="trainer ranks (the config's TP/PP must fit)")
    p.add_argument("overrides", nargs="*", help="config overrides for the trainer, e.g. train.steps=10")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    from megafork.train.config import ConfigError, load_config

    try:
        cfg = load_config(CONFIG, args.overrides)  # validates the overrides before any work
    except ConfigError as e:
        p.exit(2, f"megafork.demo: {e}\n")
    data_dir = Path(cfg.model.hf_path).parent  # the warm start writes hf_sft/ and the prompt files here
    run_dir = cfg.log.run_dir
    warm = data_dir / "warm_start.json"
    if args.fresh or not warm.is_file() or not Path(cfg.model.hf_path, "config.json").is_file():
        print(f"[demo] 1/3 warm start: tiny Qwen3 + task tokenizer -> {cfg.model.hf_path}", flush=True)
        from megafork.demo.prepare import prepare_demo

        prepare_demo(data_dir)
    else:
        print(f"[demo] 1/3 warm start: reusing {cfg.model.hf_path} ({warm}; --fresh to redo it)", flush=True)
    t_train = time.perf_counter()

    print(f"[demo] 2/3 RL: torchrun --nproc_per_node={args.nproc} -m megafork train --config {CONFIG} "
          + " ".join(args.overrides), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "megafork", "train", "--config", CONFIG, *args.overrides]
    rc = subprocess.call(cmd, env=env)
    if rc:
        print(f"[demo] training failed (exit code {rc})", file=sys.stderr)
        return rc
    t_analyze = time.perf_counter()

    print(f"[demo] 3/3 plots: megafork analyze {run_dir}", flush=True)
    from megafork.analysis.cli import analyze

    result = analyze(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(wall_seconds=time.perf_counter() - t0, train_seconds=t_analyze - t_train,
                   warm_start_seconds=t_train - t0)
    summary_path.write_text(json.dumps(summary, indent=1))
    init, final = summary["initial_accuracy"], summary["final_accuracy"]
    print(f"\n[demo] held-out accuracy (avg@k, temperature 1.0): {init:.3f} -> {final:.3f} "
          f"({100 * (final - init):+.1f} points) in {summary['steps']} RL steps")
    print(f"[demo] wall time {summary['wall_seconds']:.0f} s (warm start {summary['warm_start_seconds']:.0f} s, "
          f"RL {summary['train_seconds']:.0f} s)")
    print(f"[demo] summary: {summary_path}")
    for plot in result["plots"]:
        print(f"[demo] plot: {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

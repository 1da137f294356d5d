"""The CPU demo's RL step: phase split, s/step with and without dynamic sampling, and TRL beside it.

    python -m bench step
    BENCH_STEP_TRL_PYTHON=/path/to/trl-venv/bin/python python -m bench step    # + TRL GRPOTrainer
    BENCH_STEP_BASELINE=/path/to/older/checkout python -m bench step           # + "before" rows
    BENCH_STEP_ONLY="demo layout,TRL" BENCH_STEP_STEPS=4 BENCH_STEP_ROUNDS=3 python -m bench step

Every variant trains `examples/configs/tiny_cpu.yaml` (the demo's warm-started tiny Qwen3, 64
prompts x 8 samples a step, two optimizer steps, max 8 response tokens) for BENCH_STEP_STEPS
steps (default 5) with evaluation and checkpoints off, in its own process(es) through
`bench/step_worker.py`; the first step is a warm-up and is not counted. The variants run
interleaved, round after round (BENCH_STEP_ROUNDS, default 2), so a change in machine load hits
them all alike; the table gives medians over every counted step of every round.

Variants, dynamic sampling off (the same work per step as TRL): the demo's layout (data parallel
over 2 gloo ranks, 1 thread each), TP=2 on 2 ranks (the layout before), TP=1 on one process with
1 thread and with 2; then the demo's layout with DAPO dynamic sampling on (1.5x prompts a round,
up to 3 rounds), also per kept group; TRL's
`GRPOTrainer` on the same task and geometry (`bench/trl_demo_step.py`; needs a Python with `trl`,
kept out of megafork's venv because it pins other versions); and, with BENCH_STEP_BASELINE, the
demo layout of another checkout (e.g. the commit before a change; its own tiny_cpu.yaml), run
by this venv on this checkout's demo data.

Columns: wall s/step (what a user waits), CPU s/step (summed over the run's processes: the
work done, much less sensitive to other load on a shared machine), the wall phase split of
rank 0, and the ratio of wall s/step to TRL's (or to the first row without TRL). The machine's
load average is printed with the table.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import print_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "examples/configs/tiny_cpu.yaml"
QUIET = ["eval.path=", "log.tensorboard=false", "log.entropy_dump_every=0", "log.progress_bar=false",
         "train.save_every=0"]
PHASES = ("rollout", "old_pass", "update", "sync")


def _data_dir() -> Path:
    """The demo's warm start (made once by `megafork.demo.prepare` if missing; ~1-4 min)."""
    data = ROOT / "runs" / "tiny_cpu"
    if not (data / "warm_start.json").is_file() or not (data / "hf_sft" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "megafork.demo.prepare", "--run-dir", str(data)], cwd=ROOT, check=True)
    return data


def _megafork(tree: Path, data: Path, nproc: int, threads: int, overrides: list[str], out: Path,
              steps: int) -> list[dict]:
    """One training run of `steps` steps with checkout `tree`'s megafork; per-step records of every rank."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PYTHONPATH=str(tree))
    # The worker runs by path, so an older checkout without it can be timed; the data are this one's.
    # steps + 1: the last step has no end stamp (see step_worker), so as many steps count as TRL's.
    worker = [str(ROOT / "bench" / "step_worker.py"), str(out), "--config", CONFIG, f"train.steps={steps + 1}",
              f"model.hf_path={data / 'hf_sft'}", f"data.train_path={data / 'train.jsonl'}",
              f"log.dir={out.parent}", f"log.run_name={out.name}", *QUIET, *overrides]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    subprocess.run([sys.executable, *launcher, *worker], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text())["steps"] for r in range(nproc)]
    rows = []
    for per_rank in zip(*ranks, strict=True):
        r0 = per_rank[0]
        rows.append({"wall": r0["wall"], "cpu": sum(r["cpu"] for r in per_rank),
                     **{p: r0["phase_wall"].get(p, 0.0) for p in PHASES}, "groups_kept": r0["groups_kept"]})
    return rows[1:]  # step 0 warms up


def _trl(python: str, data: Path, threads: int, out: Path, steps: int) -> list[dict]:
    subprocess.run([python, str(ROOT / "bench" / "trl_demo_step.py"), "--data", str(data), "--steps", str(steps),
                    "--threads", str(threads), "--out", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    res = json.loads(out.read_text())
    return [{"wall": w, "cpu": c} for w, c in zip(res["step_seconds"], res["step_cpu_seconds"], strict=True)][1:]


def main() -> None:
    steps = int(os.environ.get("BENCH_STEP_STEPS", "5"))
    rounds = int(os.environ.get("BENCH_STEP_ROUNDS", "2"))
    trl_python = os.environ.get("BENCH_STEP_TRL_PYTHON", "")
    baseline = os.environ.get("BENCH_STEP_BASELINE", "")
    data = _data_dir()
    off, on = ["algo.dynamic_sampling=false"], ["algo.dynamic_sampling=true"]
    tp1, tp2 = ["parallel.tp=1"], ["parallel.tp=2"]
    variants = [
        ("demo layout: DP=2 (TP=1), 2 procs x 1 thread", lambda o: _megafork(ROOT, data, 2, 1, off + tp1, o, steps)),
        ("TP=2, 2 procs x 1 thread", lambda o: _megafork(ROOT, data, 2, 1, off + tp2, o, steps)),
        ("TP=1, 1 proc x 1 thread", lambda o: _megafork(ROOT, data, 1, 1, off + tp1, o, steps)),
        ("TP=1, 1 proc x 2 threads", lambda o: _megafork(ROOT, data, 1, 2, off + tp1, o, steps)),
        ("demo layout, dynamic sampling on", lambda o: _megafork(ROOT, data, 2, 1, on + tp1, o, steps)),
    ]
    if baseline:  # its own tiny_cpu.yaml layout
        base = Path(baseline).resolve()
        variants += [
            (f"before ({base.name}): its demo layout", lambda o: _megafork(base, data, 2, 1, off, o, steps)),
            (f"before ({base.name}): dynamic sampling on", lambda o: _megafork(base, data, 2, 1, on, o, steps)),
        ]
    if trl_python:
        variants += [("TRL GRPOTrainer, 1 proc x 2 threads", lambda o: _trl(trl_python, data, 2, o, steps)),
                     ("TRL GRPOTrainer, 1 proc x 1 thread", lambda o: _trl(trl_python, data, 1, o, steps))]
    only = [w for w in os.environ.get("BENCH_STEP_ONLY", "").split(",") if w]
    variants = [v for v in variants if not only or any(w in v[0] for w in only)]
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            for i, (name, run) in enumerate(variants):
                try:
                    results[name] += run(Path(tmp) / f"r{rnd}v{i}")
                except subprocess.CalledProcessError as e:
                    print(f"[bench step] {name}: failed ({e.returncode}): {e.stderr.decode()[-2000:]}", file=sys.stderr)
    load = os.getloadavg()
    med = {name: {k: statistics.median(r[k] for r in recs) for k in ("wall", "cpu")}
           for name, recs in results.items() if recs}
    # Ratios against each TRL row (or the first row without TRL), wall and CPU.
    refs = [n for n in med if n.startswith("TRL")] or ([variants[0][0]] if variants[0][0] in med else [])
    rows = []
    for name, recs in results.items():
        if not recs:
            rows.append([name, "failed"] + [""] * (8 + 2 * len(refs)))
            continue
        phases = [statistics.median(r[p] for r in recs) if p in recs[0] else "" for p in PHASES]
        kept = [r for r in recs if r.get("groups_kept")]
        per_group = statistics.median(r["wall"] / r["groups_kept"] for r in kept) if kept else ""
        ratios = [med[name][k] / med[ref][k] for ref in refs for k in ("wall", "cpu")]
        rows.append([name, med[name]["wall"], med[name]["cpu"], *phases, per_group, *ratios, len(recs)])
    short = [ref.replace("TRL GRPOTrainer, 1 proc x ", "TRL ") for ref in refs]
    print_table(
        "bench step: the CPU demo's RL step (tiny_cpu.yaml, 64 prompts x 8, 2 optimizer steps)",
        ["variant", "wall s/step", "CPU s/step", "rollout s", "old pass s", "update s", "sync s",
         "wall s per kept group", *[f"{k} x {r}" for r in short for k in ("wall", "CPU")], "steps"], rows,
        note=f"Medians over {rounds} interleaved rounds x {steps - 1} counted steps; load average "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs at the end. "
             "Phases are rank 0's wall seconds (rollout includes scattering the batch to the ranks); CPU is "
             "summed over the run's processes and threads.")


if __name__ == "__main__":
    main()

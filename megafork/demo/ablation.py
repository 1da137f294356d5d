"""The paper's token ablation at toy scale, several seeds per row (`make ablation`).

    .venv/bin/python -m megafork.demo ablation                       # every row, 3 seeds, 40 steps
    .venv/bin/python -m megafork.demo ablation --seeds 2 --steps 20 --rows all,top20 --out runs/abl

Every run starts from the demo's warm start (runs/tiny_cpu/hf_sft, written once by
`megafork.demo.prepare`) and goes through the real trainer (`torchrun -m megafork train` on
examples/configs/tiny_cpu.yaml); a row changes only `forking.*` / `algo.normalizer`, a seed
changes `train.seed` (rollout sampling, the random-mode draw and the evaluation's sampling; the
held-out prompts are the same for every run). Finished runs (a `summary.json` with the asked
step count) are skipped, so an interrupted ablation resumes where it stopped.

Writes DIR/summary.json (per run and per row), DIR/ablation.md (the table) and
DIR/ablation.png (held-out accuracy against step, mean over seeds with a ±1 sd band).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIG = "examples/configs/tiny_cpu.yaml"
DEFAULT_OUT = "runs/ablation"
# Seconds per RL step (evals included) and per run (startup) of the 40-step demo on this 2-core
# machine when quiet; used for the up-front estimate until the ablation has timed its own runs.
DEFAULT_SECONDS_PER_STEP = 2.2
DEFAULT_SECONDS_PER_RUN = 25.0


@dataclass(frozen=True)
class Row:
    """One ablation row: which tokens the update sees."""

    name: str
    label: str
    overrides: tuple[str, ...]


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("all", "all response tokens (plain DAPO)", ("forking.mode=all", "forking.ratio=1.0")),
    Row("top10", "top-10% entropy", ("forking.mode=top", "forking.ratio=0.1")),
    Row("top20", "top-20% entropy (forking tokens)", ("forking.mode=top", "forking.ratio=0.2")),
    Row("top50", "top-50% entropy", ("forking.mode=top", "forking.ratio=0.5")),
    Row("random20", "random 20%", ("forking.mode=random", "forking.ratio=0.2")),
    Row("bottom80", "bottom-80% entropy", ("forking.mode=bottom", "forking.ratio=0.8")),
    Row("local20", "top-20%, released code's semantics (per micro-batch topk, selected-token mean)",
        ("forking.mode=top", "forking.ratio=0.2", "forking.scope=local", "algo.normalizer=selected_tokens")),
)}


def parse_rows(text: str) -> list[Row]:
    """'all,top20' -> the rows, in the given order; unknown names are an error naming the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ValueError(f"--rows: expected a comma-separated subset of {','.join(ROWS)}, found {text!r}")
    return [ROWS[n] for n in names]


def run_name(row: Row, seed: int) -> str:
    return f"{row.name}-seed{seed}"


def finished(run_dir: Path, steps: int) -> dict | None:
    """The run's summary if it completed `steps` steps, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("steps") == steps and summary.get("final_accuracy") is not None else None


def eval_curve(run_dir: Path, summary: dict) -> list[tuple[int, float]]:
    """(step, held-out accuracy) of a finished run: the initial evaluation, then every logged one."""
    from megafork.analysis.io import METRIC_EVAL_ACCURACY, read_metrics

    curve = [(0, float(summary["initial_accuracy"]))]
    for row in read_metrics(run_dir / "metrics.jsonl"):
        if row["step"] > 0 and row.get(METRIC_EVAL_ACCURACY) is not None:  # step 0 is the initial eval
            curve.append((int(row["step"]), float(row[METRIC_EVAL_ACCURACY])))
    if curve[-1][0] != summary["steps"]:
        curve.append((int(summary["steps"]), float(summary["final_accuracy"])))
    return curve


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(out: Path, rows: list[Row], seeds: list[int], steps: int) -> dict:
    """Per-run and per-row results of the finished runs under `out` (a row lists only its finished seeds)."""
    runs, by_row = [], {}
    for row in rows:
        done = []
        for seed in seeds:
            run_dir = out / run_name(row, seed)
            summary = finished(run_dir, steps)
            if summary is None:
                continue
            rec = {"row": row.name, "seed": seed, "run_dir": str(run_dir),
                   "initial_accuracy": summary["initial_accuracy"], "final_accuracy": summary["final_accuracy"],
                   "gain": summary["final_accuracy"] - summary["initial_accuracy"],
                   "wall_seconds": summary.get("ablation_seconds", summary.get("wall_seconds")),
                   "curve": eval_curve(run_dir, summary)}
            runs.append(rec)
            done.append(rec)
        if done:
            gain, gain_sd = _mean_sd([r["gain"] for r in done])
            final, final_sd = _mean_sd([r["final_accuracy"] for r in done])
            by_row[row.name] = {
                "label": row.label, "overrides": list(row.overrides), "seeds": [r["seed"] for r in done],
                "initial_accuracy": statistics.fmean(r["initial_accuracy"] for r in done),
                "final_mean": final, "final_sd": final_sd, "gain_mean": gain, "gain_sd": gain_sd,
                "minutes": sum(r["wall_seconds"] or 0.0 for r in done) / 60.0,
            }
    return {"steps": steps, "seeds": seeds, "runs": runs, "rows": by_row}


def markdown_table(result: dict) -> str:
    """The ablation table: one line per row with mean ± sd over its seeds."""
    lines = [f"{result['steps']} RL steps from one warm start; held-out avg@4 at temperature 1.0; "
             f"mean ± sd over seeds.", "",
             "| tokens trained on | overrides | seeds | held-out accuracy after | gain (points) | minutes |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"].values():
        lines.append(f"| {r['label']} | `{' '.join(r['overrides'])}` | {len(r['seeds'])} | "
                     f"{r['final_mean']:.3f} ± {r['final_sd']:.3f} | "
                     f"{100 * r['gain_mean']:+.1f} ± {100 * r['gain_sd']:.1f} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Held-out accuracy against step: one line per row (mean over seeds) with a ±1 sd band."""
    from megafork.analysis.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["rows"]:
        curves = [r["curve"] for r in result["runs"] if r["row"] == name]
        steps = [s for s, _ in curves[0]]
        curves = [c for c in curves if [s for s, _ in c] == steps]  # same eval schedule for every seed
        acc = [[a for _, a in c] for c in curves]
        mean, sd = zip(*(_mean_sd(list(col)) for col in zip(*acc)))
        ax.plot(steps, mean, marker="o", label=f"{name} (n={len(acc)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (avg@4)")
    ax.set_title("token ablation, mean ± 1 sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def estimate_seconds(out: Path, pending: int, steps: int, seeds: list[int], rows: list[Row],
                     finished_steps: int) -> float:
    """Expected wall time of `pending` runs: from this ablation's own timed runs when it has any."""
    timed = [r for r in summarize(out, rows, seeds, finished_steps)["runs"] if r["wall_seconds"]]
    if timed:
        per_step = statistics.median(r["wall_seconds"] / finished_steps for r in timed)
        return pending * per_step * steps
    return pending * (DEFAULT_SECONDS_PER_RUN + DEFAULT_SECONDS_PER_STEP * steps)


def _train(config: str, run_dir: Path, row: Row, seed: int, steps: int, nproc: int, extra: list[str]) -> None:
    overrides = [*row.overrides, f"train.seed={seed}", f"train.steps={steps}", f"log.dir={run_dir.parent}",
                 f"log.run_name={run_dir.name}", "train.keep_last=1", "train.resume=none", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megafork", "train", "--config", config, *overrides]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        rc = subprocess.call(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if rc:
        raise RuntimeError(f"ablation run {run_dir.name} failed (exit code {rc}); its output is in {log_path}")


def run_ablation(rows: list[Row], seeds: int, steps: int, out: str | Path, nproc: int = 2,
                 extra: list[str] | None = None, config: str = CONFIG, log=print) -> dict:
    """Run every (row, seed) not finished yet, then write summary.json, ablation.md and ablation.png.

    Args:
        rows: the rows (`ROWS` values).
        seeds: seeds per row (train.seed = 1, 2, ...).
        steps: RL steps per run.
        out: output directory; one run directory per (row, seed) below it.
        nproc: trainer processes per run (the config's TP/PP must fit).
        extra: further trainer overrides applied to every run (validated first).
        config: the trainer config every run starts from (default: the demo's).
        log: callable taking a progress line.

    Returns:
        The summary written to out/summary.json.
    """
    from megafork.train.config import load_config

    extra = list(extra or [])
    out = Path(out)
    seed_list = list(range(1, seeds + 1))
    for row in rows:  # validate every run's overrides before any work
        load_config(config, [*row.overrides, f"train.steps={steps}", *extra])
    cfg = load_config(config, extra)
    if not (Path(cfg.model.hf_path) / "config.json").is_file():
        if config != CONFIG:
            raise ValueError(f"model.hf_path: expected an HF model directory with config.json, found "
                             f"{cfg.model.hf_path!r} without one (config {config})")
        from megafork.demo.prepare import prepare_demo

        log(f"[ablation] warm start -> {cfg.model.hf_path}")
        prepare_demo(Path(cfg.model.hf_path).parent)
    todo = [(row, seed) for row in rows for seed in seed_list if finished(out / run_name(row, seed), steps) is None]
    skipped = len(rows) * len(seed_list) - len(todo)
    eta = estimate_seconds(out, len(todo), steps, seed_list, rows, steps)
    log(f"[ablation] {len(rows)} rows x {len(seed_list)} seeds x {steps} steps: {len(todo)} runs to go "
        f"({skipped} finished, skipped); expected {eta / 60:.0f} min on this machine")
    for i, (row, seed) in enumerate(todo, 1):
        run_dir = out / run_name(row, seed)
        log(f"[ablation] {i}/{len(todo)} {run_dir.name}: {' '.join(row.overrides)} train.seed={seed}")
        t0 = time.perf_counter()
        _train(config, run_dir, row, seed, steps, nproc, extra)
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary["ablation_seconds"] = time.perf_counter() - t0
        summary_path.write_text(json.dumps(summary, indent=1))
        log(f"[ablation]   held-out {summary['initial_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
            f"in {summary['ablation_seconds']:.0f} s")
    result = summarize(out, rows, seed_list, steps)
    result["table"] = markdown_table(result)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    (out / "ablation.md").write_text(result["table"] + "\n")
    result["plot"] = str(plot(result, out / "ablation.png"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megafork.demo ablation", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    p.add_argument("--steps", type=int, default=40, help="RL steps per run (default 40, as the demo)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--nproc", type=int, default=2, help="trainer processes per run")
    p.add_argument("--config", default=CONFIG, help=f"trainer config of every run (default {CONFIG})")
    p.add_argument("overrides", nargs="*", help="trainer overrides for every run, e.g. eval.every=5")
    args = p.parse_args(argv)
    try:
        if args.seeds < 1 or args.steps < 1:
            raise ValueError(f"--seeds/--steps: expected integers >= 1, found {args.seeds}/{args.steps}")
        rows = parse_rows(args.rows)
        result = run_ablation(rows, args.seeds, args.steps, args.out, args.nproc, args.overrides, args.config)
    except (ValueError, RuntimeError) as e:
        print(f"megafork.demo ablation: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"[ablation] wrote {Path(args.out) / 'summary.json'}, {Path(args.out) / 'ablation.md'}, {result['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

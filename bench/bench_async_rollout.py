"""Step wall time with `train.rollout_ahead` 0 vs 1: rollouts from a `megafork serve` process.

    .venv/bin/python -m bench async_rollout

The tiny CPU setup of the demo (its Qwen3 shape and arithmetic prompts, random weights so every
response runs to the length cap and steps cost the same): one trainer process and one
`megafork serve` subprocess, one thread each. Both modes run the same steps in the same
invocation, interleaved run by run; per run the first step is dropped (it is synchronous in both
modes) and the table shows the medians over the remaining steps of every run.

Columns: step wall time (between consecutive metrics rows), the time the trainer waited for
rollouts (`seconds_rollout_wait`: taking the batch plus the wait before the weight sync), and
the phase split of the synchronous run. On this 2-core machine generation and training compete
for the same cores, so the measured gain is a floor; with the engine on its own GPUs the step
would take max(generate, train) + sync instead of generate + train + sync, which is the
"expected on GPUs" line computed from the measured split.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_table

STEPS = 6
REPEATS = 2
TRAIN = dict(steps=STEPS, prompts_per_step=32, minibatch_prompts=16, micro_batch_size=64, save_every=0,
             resume="none", seed=7)


def _worker(rank, world, cfg_dict):
    """One training run; returns the wall-clock time at every metrics row."""
    import torch

    from megafork.train import metrics
    from megafork.train.config import Config
    from megafork.train.loop import train

    torch.set_num_threads(1)
    stamps = []
    real_log = metrics.MetricsLogger.log

    def log(self, step, row):
        stamps.append(time.perf_counter())
        return real_log(self, step, row)

    metrics.MetricsLogger.log = log
    train(Config.from_dict(cfg_dict))
    return stamps


def _setup(root: Path) -> Path:
    from megafork.demo.model import create_demo_model
    from megafork.demo.task import ArithmeticTask

    task = ArithmeticTask(2)
    hf = create_demo_model(root / "hf", task, seed=0)
    with (root / "train.jsonl").open("w") as f:
        for p in task.sample(512, seed=1):
            f.write(json.dumps(p.as_row()) + "\n")
    return hf


def _config(root: Path, hf: Path, url: str, ahead: int, name: str) -> dict:
    return {
        "model": {"hf_path": str(hf), "dtype": "float32", "head_chunk_tokens": 1024},
        "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},
        "rollout": {"engine": "sglang", "sglang_urls": [url], "max_response_len": 8},
        "algo": {"n": 8, "overlong_shaping": False, "dynamic_sampling": False, "rollout_correction": "token_tis"},
        "data": {"train_path": str(root / "train.jsonl"), "reward": "dapo", "max_prompt_len": 32},
        "optim": {"lr": 5e-4, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {**TRAIN, "rollout_ahead": ahead},
        "log": {"dir": str(root / "runs"), "run_name": name, "tensorboard": False, "progress_bar": False},
    }


def main() -> None:
    from megafork.rollout import launch_servers, stop_servers
    from megafork.testing import run_ranks
    from megafork.testing.multirank import free_port

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = _setup(root)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs = launch_servers([[sys.executable, "-m", "megafork", "serve", "--model", str(hf), "--port", str(port),
                                 "--device", "cpu", "--threads", "1", "--log-level", "WARNING"]], [url], timeout_s=120)
        per_mode: dict[int, dict[str, list[float]]] = {0: {}, 1: {}}
        try:
            for rep in range(REPEATS):
                for ahead in (0, 1):
                    name = f"ahead{ahead}_{rep}"
                    stamps = run_ranks(_worker, 1, args=(_config(root, hf, url, ahead, name),),
                                       init_process_group=False, timeout=900)[0]
                    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
                    rows = [r for r in rows if "seconds_rollout" in r]
                    got = per_mode[ahead]
                    got.setdefault("step", []).extend(b - a for a, b in zip(stamps, stamps[1:]))
                    for key in ("seconds_rollout_wait", "seconds_rollout", "seconds_old_pass", "seconds_update",
                                "seconds_sync", "staleness_mean"):
                        got.setdefault(key, []).extend(r.get(key, 0.0) for r in rows[1:])
        finally:
            stop_servers(procs)

    med = {a: {k: statistics.median(v) for k, v in d.items()} for a, d in per_mode.items()}
    base = med[0]["step"]
    rows = []
    for a in (0, 1):
        m = med[a]
        rows.append([f"rollout_ahead={a}", m["step"], m["seconds_rollout_wait"],
                     1.0 - m["seconds_rollout_wait"] / med[0]["seconds_rollout_wait"], m["staleness_mean"],
                     base / m["step"]])
    n = len(per_mode[0]["step"])
    print_table(f"async_rollout: step wall time, tiny CPU config, megafork serve (median of {n} steps per mode)",
                ["mode", "step s", "trainer waited for rollouts s", "wait hidden", "staleness", "speed-up vs 0"],
                rows)
    gen, train_s = med[0]["seconds_rollout"], med[0]["seconds_old_pass"] + med[0]["seconds_update"]
    sync = med[0]["seconds_sync"]
    other = max(base - gen - train_s - sync, 0.0)
    ideal = max(gen, train_s) + sync + other
    print_table("phase split of rollout_ahead=0 (medians) and the gain it allows",
                ["generate s", "old pass + update s", "sync s", "other s", "generate share",
                 "expected speed-up, engine on its own GPUs"],
                [[gen, train_s, sync, other, gen / base, base / ideal]],
                note="expected speed-up = (generate + train + sync + other) / (max(generate, train) + sync + other): "
                     "overlap hides the shorter of generation and training when they do not share devices. At "
                     "verl's DAPO-32B split (rollout ~70% of the step) the same formula gives 1 / 0.7 = 1.43x.")


if __name__ == "__main__":
    main()

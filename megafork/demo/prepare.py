"""Set up everything the CPU demo's RL run reads: a warm-started tiny Qwen3 and the prompt files.

    .venv/bin/python -m megafork.demo.prepare --run-dir runs/tiny_cpu
    # -> runs/tiny_cpu/hf_init, hf_sft (model.hf_path), train.jsonl (data.train_path),
    #    heldout.jsonl (eval.path), warm_start.json (SFT steps, time, accuracies)

`examples/configs/tiny_cpu.yaml` points at these paths. The held-out prompts are the same
problems the warm start reports its held-out accuracy on, and none of them is a training prompt.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megafork.demo.model import DemoModelConfig, create_demo_model
from megafork.demo.sft import SFTConfig, warm_start
from megafork.demo.task import ArithmeticTask


@dataclass
class DemoSetup:
    """The demo's task, model shape and warm-start recipe (tuned with the RL trainer on tiny_cpu.yaml).

    Attributes:
        difficulty: `ArithmeticTask` level.
        rl_train_problems: prompts written to train.jsonl.
        model: the tiny Qwen3's shape.
        sft: the warm-start recipe (stops at a partial validation accuracy).
    """

    difficulty: int = 2
    rl_train_problems: int = 4096
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(
        steps=800, batch_size=128, lr=3e-3, warmup=20, target_accuracy=0.3, check_every=25))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def prepare_demo(run_dir: str | Path, setup: DemoSetup | None = None, log=print) -> dict:
    """Create the model, warm-start it and write the prompt files under `run_dir`.

    Args:
        run_dir: the demo's run directory.
        setup: task/model/recipe; DemoSetup() when None.
        log: callable taking a line of progress text.

    Returns:
        {"hf_sft", "train_path", "heldout_path", "warm_start": SFT stats, "seconds"}.
    """
    setup = setup or DemoSetup()
    run = Path(run_dir)
    task = ArithmeticTask(setup.difficulty)
    start = time.perf_counter()
    hf_init = create_demo_model(run / "hf_init", task, setup.model, seed=setup.sft.seed)
    stats = warm_start(hf_init, run / "hf_sft", task, setup.sft, log=log)
    # The same split the warm start used: its held-out problems are the RL run's eval set.
    train, heldout = task.split(setup.sft.train_problems, setup.sft.heldout_problems, seed=setup.sft.seed)
    train_path = write_jsonl(run / "train.jsonl", [p.as_row() for p in train[:setup.rl_train_problems]])
    heldout_path = write_jsonl(run / "heldout.jsonl", [p.as_row() for p in heldout])
    seconds = time.perf_counter() - start
    summary = {"setup": asdict(setup), "warm_start": stats, "seconds": seconds}
    (run / "warm_start.json").write_text(json.dumps(summary, indent=1))
    log(f"warm start: {stats['steps']} steps in {stats['seconds']:.1f}s, held-out accuracy "
        f"{stats['heldout_accuracy']:.3f} sampled at temperature 1.0 ({stats['greedy_accuracy']:.3f} greedy)")
    return {"hf_sft": run / "hf_sft", "train_path": train_path, "heldout_path": heldout_path,
            "warm_start": stats, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/tiny_cpu")
    args = p.parse_args(argv)
    prepare_demo(args.run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

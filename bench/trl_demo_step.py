"""TRL's GRPOTrainer on the CPU demo's task: the peer that `python -m bench step` times megafork against.

Run with a Python that has `trl` (kept out of megafork's venv; see `bench/bench_step.py`):

    /path/to/trl-venv/bin/python bench/trl_demo_step.py --data runs/bench_step --steps 6 --out trl.json

The same model (the demo's warm-started tiny Qwen3), prompts, verifier ("dapo": +1/-1 on the
"Answer: X" line, megafork's own function, imported from this checkout) and batch geometry as
`examples/configs/tiny_cpu.yaml` with dynamic sampling off: 64 prompts x 8 samples generated per
RL step, two optimizer steps of 32 prompts (`steps_per_generation=2`,
`per_device_train_batch_size=256`), at most 8 response tokens, lr 5e-4, clip 0.2/0.28, fp32,
the top-20% entropy tokens (`top_entropy_quantile=0.2`, TRL's forking-token option), no
gradient checkpointing. One RL step = one generation + two optimizer steps; the script writes
the wall and process-CPU seconds of each (from optimizer-step end to optimizer-step end) to
`--out` as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the demo's data dir (hf_sft/, train.jsonl)")
    p.add_argument("--steps", type=int, default=6, help="RL steps (each = 2 optimizer steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))  # the demo's verifier (megafork.rewards is plain Python)
    from megafork.rewards import get_reward

    verify = get_reward("dapo")
    data = Path(args.data)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])

    def dapo(completions, answer, **_):
        return [verify(c, a) for c, a in zip(completions, answer, strict=True)]

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    cfg = GRPOConfig(
        output_dir=str(data / "trl_out"), max_steps=2 * args.steps, seed=args.seed,
        per_device_train_batch_size=256, steps_per_generation=2, num_generations=8, max_completion_length=8,
        temperature=1.0, top_p=1.0, learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", top_entropy_quantile=0.2,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        save_strategy="no", report_to="none", logging_steps=10_000, disable_tqdm=True,
        dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(str(data / "hf_sft"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(data / "hf_sft"))
    trainer = GRPOTrainer(model=model, reward_funcs=dapo, args=cfg, train_dataset=dataset,
                          processing_class=tok, callbacks=[Stamp()])
    trainer.train()
    # stamps[0] = train begin; stamps[2k+2] ends RL step k (its generation + two optimizer steps).
    ends = range(0, len(stamps) - 2, 2)
    Path(args.out).write_text(json.dumps({
        "step_seconds": [stamps[i + 2][0] - stamps[i][0] for i in ends],
        "step_cpu_seconds": [stamps[i + 2][1] - stamps[i][1] for i in ends],  # all threads of the process
        "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

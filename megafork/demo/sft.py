"""Supervised warm start for the demo model: teach the answer format and most of the skill.

    stats = warm_start(hf_init_dir, out_dir, task, SFTConfig(steps=300))

This is data preparation, not the RL path, so it is plain torch + transformers. It stops early on
purpose: the RL demo needs a model whose sampled accuracy at temperature 1.0 is partial.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megafork.demo.sampling import sampled_accuracy
from megafork.demo.task import ArithmeticTask, Problem


@dataclass
class SFTConfig:
    """Warm-start recipe.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step.
        lr: peak AdamW learning rate (linear warm-up over `warmup` steps, then constant).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay.
        train_problems: size of the SFT problem pool.
        heldout_problems: size of the held-out set used for accuracy.
        answer_noise: fraction of training targets whose answer has one digit replaced by a
            different random digit. The warm-started model then samples the right answer only
            about (1 - 0.9 * answer_noise) of the time at temperature 1.0 while the right answer
            stays its mode, which is the partial, uncertain starting point RLVR needs. The
            uncertainty sits on the answer digits, so those are the high-entropy (forking) tokens.
        target_accuracy: stop as soon as the sampled (temperature 1.0) accuracy on a validation
            split reaches this (checked every `check_every` steps; 0 disables). Stopping on a
            measured accuracy rather than a step count keeps the starting point partial even
            where a different torch build shifts the learning curve by some steps.
        check_every: steps between validation checks.
        seed: seed for data order, problem split, noise and torch.
        threads: torch intra-op threads. 1 is best on the 2-core demo machine: with 2 ranks or other
            load, 2 threads per process oversubscribe the cores and ran 5-10x slower in our measurements.
    """

    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    train_problems: int = 20000
    heldout_problems: int = 256
    answer_noise: float = 0.0
    target_accuracy: float = 0.0
    check_every: int = 25
    seed: int = 0
    threads: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "train_problems", "heldout_problems", "threads", "check_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SFTConfig.{name}: expected an integer >= 1, found {v!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"SFTConfig.warmup: expected an integer >= 0, found {self.warmup!r}")
        if not (isinstance(self.answer_noise, float) and 0.0 <= self.answer_noise < 1.0):
            raise ValueError(f"SFTConfig.answer_noise: expected a float in [0, 1), found {self.answer_noise!r}")
        if not (isinstance(self.target_accuracy, float) and 0.0 <= self.target_accuracy < 1.0):
            raise ValueError(f"SFTConfig.target_accuracy: expected a float in [0, 1), found {self.target_accuracy!r}")
        if not (isinstance(self.lr, float) and self.lr > 0):
            raise ValueError(f"SFTConfig.lr: expected a float > 0, found {self.lr!r}")


def perturb_answer(problem: Problem, rng: random.Random) -> Problem:
    """`problem` with one digit of its answer replaced by a different digit (no leading zero)."""
    digits = list(problem.answer)
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
    digits[i] = rng.choice(choices)
    return Problem(expression=problem.expression, answer="".join(digits))


def sft_batch(tok, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, labels) with loss only on response tokens and eos."""
    rows = []
    for p in problems:
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        resp = tok(p.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt, resp))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        mask[i, :len(a) + len(b)] = 1
        labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
    return ids, mask, labels


def warm_start(hf_dir: str | Path, out_dir: str | Path, task: ArithmeticTask, cfg: SFTConfig | None = None,
               log=print) -> dict:
    """Fine-tune the HF model in `hf_dir` on the task and save it to `out_dir`.

    Args:
        hf_dir: the initial HF checkpoint (from `create_demo_model`).
        out_dir: where the warm-started checkpoint (with tokenizer) is saved.
        task: the task to learn.
        cfg: the recipe; SFTConfig() when None.
        log: callable taking one line of progress text.

    Returns:
        {"steps" (taken), "seconds", "loss", "heldout_accuracy", "greedy_accuracy", "curve"
        (validation accuracy at each check)}. Held-out accuracy is measured on problems that
        neither training nor the validation checks saw.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or SFTConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    train, heldout = task.split(cfg.train_problems, cfg.heldout_problems, seed=cfg.seed)
    valid, train = train[:cfg.heldout_problems], train[cfg.heldout_problems:]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    rng = random.Random(cfg.seed)
    model.train()
    start = time.perf_counter()
    curve = []
    loss_value = float("nan")
    for step in range(1, cfg.steps + 1):
        batch = [perturb_answer(p, rng) if rng.random() < cfg.answer_noise else p
                 for p in rng.sample(train, cfg.batch_size)]
        ids, mask, labels = sft_batch(tok, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % cfg.check_every == 0 or step == cfg.steps:
            acc = sampled_accuracy(model, tok, valid)
            curve.append({"step": step, "loss": loss_value, "valid_accuracy": acc})
            log(f"sft step {step}: loss {loss_value:.3f}  sampled validation accuracy {acc:.3f}"
                f"  ({time.perf_counter() - start:.1f}s)")
            if cfg.target_accuracy and acc >= cfg.target_accuracy:
                break
    seconds = time.perf_counter() - start
    acc = sampled_accuracy(model, tok, heldout)
    greedy = sampled_accuracy(model, tok, heldout, greedy=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"steps": step, "seconds": seconds, "loss": loss_value, "heldout_accuracy": acc,
            "greedy_accuracy": greedy, "curve": curve}

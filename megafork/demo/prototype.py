"""Evidence that the demo task is learnable by RLVR at CPU scale: a plain-torch DAPO loop.

    .venv/bin/python -m megafork.demo.prototype --sft-dir runs/proto/sft --steps 40

This is NOT megafork's trainer (that is `megafork.train`, on megatron-core). It is a short,
single-process reference used to pick the demo's task, model size and warm-start recipe, and to
measure how fast DAPO on the top-20% entropy tokens lifts held-out accuracy:
- GRPO advantages (r - mean) / (std + eps) per group of n responses, groups with equal rewards dropped;
- an old pass (no grad) gives old log-probs and per-token entropy at temperature 1;
- the fork mask keeps the k = ceil(rho * N) highest-entropy response tokens of the step (torch.topk);
- the DAPO clip-higher loss over the selected tokens, normalised by all N response tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from megafork.demo.sampling import sample, sampled_accuracy
from megafork.demo.task import ArithmeticTask
from megafork.rewards import get_reward


@dataclass
class PrototypeConfig:
    steps: int = 40
    prompts_per_step: int = 32
    n: int = 8
    minibatches: int = 2
    lr: float = 3e-4
    clip_low: float = 0.2
    clip_high: float = 0.28
    ratio: float = 0.2
    mode: str = "top"
    max_new_tokens: int = 8
    eval_every: int = 5
    heldout: int = 256
    train_problems: int = 20000
    seed: int = 0
    threads: int = 1


def token_stats(model, seqs: torch.Tensor, attn: torch.Tensor, prompt_len: int):
    """Log-prob of each response token and the entropy of its distribution (temperature 1)."""
    logits = model(input_ids=seqs, attention_mask=attn).logits[:, prompt_len - 1:-1].float()
    logp = F.log_softmax(logits, dim=-1)
    target = seqs[:, prompt_len:]
    lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def response_mask(resp: torch.Tensor, eos: int) -> torch.Tensor:
    """1 for every response token up to and including the first eos."""
    is_eos = (resp == eos).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # eos tokens seen strictly before this one
    return (before == 0).float()


def fork_mask(entropy: torch.Tensor, mask: torch.Tensor, ratio: float, mode: str, gen: torch.Generator):
    """Select ceil(ratio * N) of the N valid tokens: highest ('top'), lowest ('bottom') entropy, or random."""
    if mode == "all":
        return mask.clone()
    flat, valid = entropy.flatten(), mask.flatten().bool()
    n = int(valid.sum())
    k = max(1, math.ceil(ratio * n))
    if mode == "top":
        score = torch.where(valid, flat, torch.full_like(flat, -float("inf")))
    elif mode == "bottom":
        score = torch.where(valid, -flat, torch.full_like(flat, -float("inf")))
    else:
        score = torch.where(valid, torch.rand(flat.shape, generator=gen), torch.full_like(flat, -float("inf")))
    sel = torch.zeros_like(flat)
    sel[torch.topk(score, k).indices] = 1.0
    return sel.view_as(mask)


def run(sft_dir: str, task: ArithmeticTask, cfg: PrototypeConfig, log=print) -> dict:
    """Run the prototype loop from the warm-started HF checkpoint in `sft_dir`; returns the curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    train, heldout = task.split(cfg.train_problems, cfg.heldout, seed=0)  # the SFT split (seed 0)
    rng = random.Random(cfg.seed + 1)
    reward_fn = get_reward("dapo")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    curve = [{"step": 0, "seconds": 0.0, "heldout_accuracy": sampled_accuracy(model, tok, heldout)}]
    log(f"step 0: held-out accuracy {curve[0]['heldout_accuracy']:.3f}")
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        probs = rng.sample(train, cfg.prompts_per_step)
        model.eval()
        prompt_ids, resp, texts = sample(model, tok, [p.prompt for p in probs], n=cfg.n,
                                         max_new_tokens=cfg.max_new_tokens)
        rewards = torch.tensor([reward_fn(t, probs[i // cfg.n].answer) for i, t in enumerate(texts)])
        groups = rewards.view(-1, cfg.n)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).flatten()
        keep = (groups.std(1) > 0).repeat_interleave(cfg.n)
        t_roll = time.perf_counter() - t0
        if keep.sum() == 0:
            log(f"step {step}: no informative group")
            continue
        seqs = torch.cat([prompt_ids, resp], 1)[keep]
        # Prompts are left-padded with the pad id (which never occurs inside a prompt); response
        # positions after eos are masked out of the loss by rmask, not out of attention.
        pl = prompt_ids.shape[1]
        attn = torch.cat([prompt_ids != tok.pad_token_id, torch.ones_like(resp, dtype=torch.bool)], 1)[keep]
        rmask = response_mask(resp[keep], tok.eos_token_id)
        adv_k = adv[keep]
        with torch.no_grad():
            old_lp, ent = token_stats(model, seqs, attn.long(), pl)
        sel = fork_mask(ent, rmask, cfg.ratio, cfg.mode, gen) * rmask
        n_tokens = rmask.sum()
        model.train()
        order = torch.randperm(seqs.shape[0], generator=gen)
        clipped = 0.0
        for mb in order.chunk(cfg.minibatches):
            lp, _ = token_stats(model, seqs[mb], attn[mb].long(), pl)
            ratio = torch.exp(lp - old_lp[mb])
            a = adv_k[mb].unsqueeze(1)
            surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a)
            # Every mini-batch is normalised by the step's response-token count / minibatches, so
            # the sum over mini-batches is the paper's mean over all response tokens.
            loss = -(surr * sel[mb]).sum() / (n_tokens / cfg.minibatches)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            clipped += float(((ratio - 1).abs() > cfg.clip_low).float().mul(sel[mb]).sum())
        row = {"step": step, "seconds": time.perf_counter() - start, "reward": rewards.mean().item(),
               "accuracy": (rewards > 0).float().mean().item(), "informative_groups": int(keep.sum()) // cfg.n,
               "selected_fraction": (sel.sum() / n_tokens).item(), "rollout_seconds": t_roll,
               "entropy_p80": torch.quantile(ent[rmask.bool()], 0.8).item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["heldout_accuracy"] = sampled_accuracy(model, tok, heldout)
        curve.append(row)
        log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return {"config": asdict(cfg), "curve": curve, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-dir", required=True)
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--out", default=None, help="write the curve as JSON here")
    for f, v in asdict(PrototypeConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    a = vars(p.parse_args(argv))
    sft_dir, difficulty, out = a.pop("sft_dir"), a.pop("difficulty"), a.pop("out")
    result = run(sft_dir, ArithmeticTask(difficulty), PrototypeConfig(**a))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

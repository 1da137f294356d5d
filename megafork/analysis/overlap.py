"""Do RL checkpoints keep the base model's forking positions? The paper's overlap measure.

    megafork analyze overlap --base runs/tiny_cpu/hf_sft --run runs/tiny_cpu --prompts 128

As in the paper (arXiv 2506.01939, Sec. 5: 98.9% at step 16 -> 86.7% at step 1360 for Qwen3-14B):
1. the base model generates one response for each of N held-out prompts (the run's `eval.path`,
   at the run's rollout temperature), once;
2. those same tokens are scored by the base model and by every checkpoint of the run, with the
   trainer's own entropy op (`fused_head_logprobs_entropy` over the megatron model's hidden states,
   temperature as in the run), one process at TP=1 (dist_checkpointing reshards the run's layout);
3. the overlap of a checkpoint is |top-ρ(base) ∩ top-ρ(checkpoint)| / |top-ρ(base)| over all the
   response tokens, with ρ = the run's `forking.ratio` and ties broken by position
   (`megafork.analysis.stats.top_overlap`).

Writes RUN_DIR/plots/overlap.md and overlap.png; `overlap_analysis` returns the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megafork.analysis.stats import top_overlap


@dataclass
class ScoredTokens:
    """Response tokens of a fixed set of sequences and one model's entropy on each."""

    token_ids: torch.Tensor   # int64 [T]
    entropy: torch.Tensor     # float32 [T]


def base_responses(base_dir: str | Path, prompts: list[list[int]], temperature: float, top_p: float,
                   max_new_tokens: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """One sampled response per prompt from the base model (the embedded engine: transformers)."""
    from megafork.rollout import SamplingParams
    from megafork.rollout.embedded import EmbeddedEngine

    engine = EmbeddedEngine.from_pretrained(base_dir)
    samples = engine.generate(prompts, SamplingParams(n=1, temperature=temperature, top_p=top_p,
                                                      max_new_tokens=max_new_tokens, seed=seed))
    return [(prompts[s.prompt_index], list(s.response_ids)) for s in samples if s.response_ids]


@torch.no_grad()
def score(model, sequences: list[tuple[list[int], list[int]]], temperature: float, chunk_size: int | None = None
          ) -> ScoredTokens:
    """Entropy of every response token of `sequences` under `model` (a one-process Qwen3GPTModel).

    Position t of a response is predicted from the hidden state at t-1, as in the trainer's old pass.
    """
    from megafork.ops import fused_head_logprobs_entropy

    model.eval()
    ids, ents = [], []
    for prompt, response in sequences:
        tokens = torch.tensor([prompt + response], dtype=torch.long)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        hidden = model(tokens, pos, None, return_hidden=True)[:, 0]          # [s, h]
        rows = torch.arange(len(prompt) - 1, tokens.shape[1] - 1)
        labels = tokens[0, rows + 1]
        _, ent = fused_head_logprobs_entropy(hidden[rows].contiguous(), model.output_weight(), labels,
                                             temperature=temperature, vocab_size=model.vocab_size_unpadded,
                                             chunk_size=chunk_size)
        ids.append(labels)
        ents.append(ent.float())
    return ScoredTokens(torch.cat(ids), torch.cat(ents))


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    from megafork.train.checkpoint_layout import checkpoints_root, list_checkpoints, validate_checkpoint

    return sorted((int(validate_checkpoint(p)["step"]), p) for p in list_checkpoints(checkpoints_root(run_dir)))


def overlap_analysis(base_dir: str | Path, run_dir: str | Path, prompts: int = 128, seed: int = 0,
                     log=print) -> list[dict]:
    """Score the base model's responses with the base and every checkpoint; return one row each.

    Args:
        base_dir: the HF directory the run started from (its `model.hf_path`).
        run_dir: the run directory (config.yaml and checkpoints/).
        prompts: how many held-out prompts (the first N of the run's `eval.path`).
        seed: sampling seed of the base model's responses.
        log: callable taking a progress line.

    Returns:
        [{"step": 0 for the base, "overlap", "entropy_mean", "tokens"}, ...] by step.
    """
    from megafork.data.dataset import PromptDataset, load_tokenizer
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights
    from megafork.models.qwen3.config import padded_vocab_size, read_hf_config
    from megafork.train.checkpoint import load_checkpoint
    from megafork.train.config import load_config

    run, base = Path(run_dir), Path(base_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {str(run)!r}: expected a run directory with config.yaml, found none")
    cfg = load_config(run / "config.yaml")
    ckpts = _checkpoints(run)
    if not ckpts:
        raise FileNotFoundError(f"--run {str(run)!r}: expected checkpoints under {run / 'checkpoints'}, found none "
                                "(train with train.save_every > 0)")
    eval_path = cfg.eval.path or cfg.data.train_path
    tokenizer = load_tokenizer(base)
    data = PromptDataset(eval_path, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    if prompts < 1:
        raise ValueError(f"--prompts: expected an integer >= 1, found {prompts}")
    ids = [data[i].prompt_ids for i in range(min(prompts, len(data)))]
    temp = cfg.rollout.temperature
    sequences = base_responses(base, ids, temp, cfg.rollout.top_p, cfg.rollout.max_response_len, seed)
    log(f"[overlap] {len(sequences)} base responses from {eval_path}; scoring base + {len(ckpts)} checkpoints")

    groups = init_distributed(ParallelConfig())
    hf = read_hf_config(base)
    opts = Qwen3BuildOptions(dtype="fp32", perform_initialization=False,
                             use_cpu_initialization=not torch.cuda.is_available())
    # The run's checkpoints hold its padded vocab, which depends on its TP size.
    model = build_qwen3(hf, opts, groups, padded_vocab=padded_vocab_size(hf.vocab_size, cfg.parallel.tp,
                                                                           opts.vocab_multiple))
    load_hf_weights(model, base, groups)
    chunk = cfg.model.head_chunk_tokens or None  # 0: the op's own bounded chunk, as in the trainer
    ref = score(model, sequences, temp, chunk)
    ratio = cfg.forking.ratio
    rows = [{"step": 0, "checkpoint": str(base), "overlap": 1.0, "entropy_mean": float(ref.entropy.mean()),
             "tokens": int(ref.entropy.numel())}]
    for step, path in ckpts:
        load_checkpoint(path, [model], None, None, groups, load_optimizer=False)
        got = score(model, sequences, temp, chunk)
        rows.append({"step": step, "checkpoint": str(path), "overlap": top_overlap(ref.entropy, got.entropy, ratio),
                     "entropy_mean": float(got.entropy.mean()), "tokens": int(got.entropy.numel())})
        log(f"[overlap] step {step}: {rows[-1]['overlap']:.4f}")
    for r in rows:
        r["ratio"] = ratio
    return rows


def overlap_markdown(rows: list[dict]) -> str:
    ratio = rows[0]["ratio"]
    lines = [f"top-{ratio:g} entropy positions of the base model's responses kept by each checkpoint "
             f"({rows[0]['tokens']} response tokens; paper, Qwen3-14B: 98.9% at step 16, 93.0% at 480, "
             "86.7% at 1360)", "", "| step | overlap with base | mean entropy |", "|---|---|---|"]
    lines += [f"| {r['step']} | {100 * r['overlap']:.1f}% | {r['entropy_mean']:.4f} |" for r in rows]
    return "\n".join(lines)


def plot_overlap(rows: list[dict], path: Path) -> Path:
    from megafork.analysis.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [100 * r["overlap"] for r in rows], marker="o")
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"top-{rows[0]['ratio']:g} position overlap with base (%)")
    ax.set_ylim(min(50.0, math.floor(min(100 * r["overlap"] for r in rows))), 100.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)

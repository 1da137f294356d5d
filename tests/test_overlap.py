"""`megafork analyze overlap`: the paper's measure on a tiny model, and the entropy summary.

    .venv/bin/python -m pytest tests/test_overlap.py -q

A run directory gets two checkpoints written in-process: one with the base weights (overlap must
be exactly 1.0) and one with a perturbed LM head, whose overlap the test recomputes on its own
with transformers in float64 (softmax entropies, top-k by a stable sort).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from megafork.analysis.stats import entropy_summary
from megafork.testing import run_ranks
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

RATIO = 0.2


def _run_dir(root: Path) -> tuple[Path, Path]:
    hf = make_tiny_qwen3(root / "hf", seed=1, tie_word_embeddings=False)
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(8)))
    run = root / "run"
    run.mkdir()
    cfg = {"model": {"hf_path": str(hf), "dtype": "float32"}, "parallel": {"tp": 2},
           "rollout": {"max_response_len": 12, "temperature": 1.0},
           "data": {"train_path": str(heldout), "max_prompt_len": 16},
           "algo": {"overlong_shaping": False}, "forking": {"ratio": RATIO}, "eval": {"path": str(heldout)},
           "log": {"run_name": "run", "dir": str(root)}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return hf, run


def _head_noise(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.3


def _write_checkpoints(rank, world, hf, run):
    """step 5: the base weights; step 10: the base with a perturbed LM head. Saved at TP=1 with
    the padded vocab of the run's TP=2 (as the run's own checkpoints would hold)."""
    from megafork.distributed import ParallelConfig, init_distributed
    from megafork.models.qwen3 import (
        Qwen3BuildOptions,
        build_qwen3,
        load_hf_weights,
        padded_vocab_size,
        read_hf_config,
    )
    from megafork.train.checkpoint import save_checkpoint
    from megafork.train.checkpoint_layout import checkpoints_root

    groups = init_distributed(ParallelConfig())
    cfg = read_hf_config(hf)
    opts = Qwen3BuildOptions(dtype="fp32", perform_initialization=False, use_cpu_initialization=True)
    model = build_qwen3(cfg, opts, groups, padded_vocab=padded_vocab_size(cfg.vocab_size, 2, opts.vocab_multiple))
    load_hf_weights(model, hf, groups)
    save_checkpoint(checkpoints_root(run), 5, [model], None, None, groups, keep_last=0)
    with torch.no_grad():
        w = model.output_layer.weight
        w[: cfg.vocab_size] += _head_noise((cfg.vocab_size, w.shape[1]))
    save_checkpoint(checkpoints_root(run), 10, [model], None, None, groups, keep_last=0)


def _analyze(rank, world, hf, run):
    from megafork.analysis.overlap import overlap_analysis

    return overlap_analysis(hf, run, prompts=8, seed=0, log=lambda *_: None)


def _independent_overlap(hf: Path, run: Path) -> tuple[float, int]:
    """Re-score the base's responses with transformers in float64 (base vs perturbed head)."""
    from transformers import Qwen3ForCausalLM

    from megafork.analysis.overlap import base_responses
    from megafork.data.dataset import PromptDataset, load_tokenizer

    data = PromptDataset(run.parent / "heldout.jsonl", load_tokenizer(hf), max_prompt_len=16)
    seqs = base_responses(hf, [data[i].prompt_ids for i in range(8)], 1.0, 1.0, 12, seed=0)
    model = Qwen3ForCausalLM.from_pretrained(hf, torch_dtype=torch.float64).eval()

    def entropies() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for prompt, response in seqs:
                logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
                logp = torch.log_softmax(logits, dim=-1)
                out.append(-(logp.exp() * logp).sum(-1))
        return torch.cat(out)

    def top(e: torch.Tensor) -> set[int]:
        k = max(1, math.ceil(RATIO * e.numel()))
        return set(torch.sort(-e, stable=True).indices[:k].tolist())

    base = entropies()
    with torch.no_grad():
        model.lm_head.weight += _head_noise(model.lm_head.weight.shape).double()
    moved = entropies()
    return len(top(base) & top(moved)) / len(top(base)), base.numel()


def test_overlap_is_one_for_base_weights_and_matches_an_independent_float64_computation(tmp_path):
    hf, run = _run_dir(tmp_path)
    run_ranks(_write_checkpoints, 1, args=(hf, run))
    rows = run_ranks(_analyze, 1, args=(hf, run))[0]
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert rows[1]["overlap"] == 1.0  # same weights, same tokens: the same positions, exactly
    expected, tokens = _independent_overlap(hf, run)
    assert rows[0]["tokens"] == tokens
    assert expected < 1.0  # the perturbation really moves the top positions
    assert rows[2]["overlap"] == pytest.approx(expected, abs=1e-12)


def test_overlap_refuses_a_run_without_checkpoints(tmp_path):
    from megafork.analysis.cli import main

    hf, run = _run_dir(tmp_path)
    assert main(["overlap", "--base", str(hf), "--run", str(run)]) == 2


def test_entropy_summary_against_hand_counts():
    e = torch.tensor([0.001, 0.005, 0.02, 0.5, 1.5, 0.009, 0.3, 2.0])
    sel = torch.tensor([False, False, False, True, True, False, False, True])
    s = entropy_summary(e, sel)
    assert s["fraction_below_0.01"] == 3 / 8
    assert s["forking_mean"] == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert s["non_forking_mean"] == pytest.approx((0.001 + 0.005 + 0.02 + 0.009 + 0.3) / 5)
    with pytest.raises(ValueError, match="selected flags"):
        entropy_summary(e, sel[:3])

"""The RLVR loop end to end: a 2-rank smoke run through the CLI, and bit-exact resume.

    .venv/bin/python -m pytest tests/test_train_loop.py -q

The smoke run launches `torchrun -m megafork train` (TP=2) on a tiny random Qwen3. The resume
test runs 4 straight steps at DP=2, then the same run interrupted right after its step-2
checkpoint and resumed with `train.resume=auto` in fresh processes, and requires every
per-step metric (timings aside) to be identical. Its reward ("digit": does the response contain
a digit?) makes about half the random model's responses right, so advantages are non-zero and
the updates really move the weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megafork.testing import run_ranks
from megafork.testing.loop_worker import loop_worker
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_double_prompts, write_sum_prompts

REPO = Path(__file__).resolve().parents[1]

# Keys the issue documents for every metrics.jsonl row.
DOCUMENTED_KEYS = {
    "step", "reward_mean", "accuracy", "response_len_mean", "entropy_p50", "entropy_p80", "entropy_p95",
    "entropy_threshold", "selected_fraction", "selected_count", "clip_fraction_low", "clip_fraction_high",
    "grad_norm", "seconds_rollout", "seconds_old_pass", "seconds_update", "seconds_sync", "logprob_gap",
    "tokens_per_second", "loss", "lr",
    "mismatch_kl", "is_weight_mean", "is_weight_max", "is_truncated_fraction", "is_masked_fraction",
}


def _write_data(root: Path) -> tuple[Path, Path, Path]:
    hf = make_tiny_qwen3(root / "hf", seed=0)
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    write_sum_prompts(train, 6)
    write_double_prompts(heldout, 4)
    return hf, train, heldout


def _config(hf_dir: Path, train_path: Path, heldout_path: Path, runs: Path, **sections) -> dict:
    cfg = {
        "model": {"hf_path": str(hf_dir), "dtype": "float32", "head_chunk_tokens": 64},
        "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},
        "rollout": {"max_response_len": 6, "batch_size": 64},
        "algo": {"n": 4, "overlong_shaping": False, "dynamic_sampling": False},
        "forking": {"ratio": 0.2, "mode": "top", "scope": "step"},
        "data": {"train_path": str(train_path), "reward": "dapo", "max_prompt_len": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 2, "prompts_per_step": 4, "minibatch_prompts": 2, "micro_batch_size": 2,
                  "save_every": 0, "resume": "none", "seed": 3},
        "eval": {"path": str(heldout_path), "every": 0, "k": 2, "temperature": 1.0, "top_p": 1.0},
        "log": {"run_name": "run", "dir": str(runs), "tensorboard": False, "progress_bar": False},
    }
    for name, body in sections.items():
        cfg[name] = {**cfg[name], **body}
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_step_smoke_run_through_the_cli_at_tp2(tmp_path):
    hf, train, heldout = _write_data(tmp_path)
    cfg = _config(hf, train, heldout, tmp_path / "runs", parallel={"tp": 2},
                  log={"run_name": "smoke", "tensorboard": True})
    cfg_path = tmp_path / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megafork",
         "train", "--config", str(cfg_path), "train.save_every=2", "algo.rollout_correction=seq_mask"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "smoke"

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]  # row 0: the starting model's held-out accuracy
    assert set(rows[0]) == {"step", "eval_accuracy"}
    for r in rows[1:]:
        assert DOCUMENTED_KEYS <= set(r), sorted(DOCUMENTED_KEYS - set(r))
        assert r["groups_kept"] == 4 and r["response_len_mean"] > 0
        # Step scope, mode top: the threshold is the 80th percentile of all response tokens.
        assert r["entropy_threshold"] == r["entropy_p80"]
        assert r["entropy_p50"] <= r["entropy_p80"] <= r["entropy_p95"]
        assert 0.2 <= r["selected_fraction"] < 0.3, r["selected_fraction"]
        # The engine samples from exactly the trainer's weights (initial HF weights, then synced).
        assert r["logprob_gap"] < 1e-4, r["logprob_gap"]
        # So the correction (seq_mask: geometric-mean mask + token TIS) keeps everything at weight ~1.
        assert 0.0 <= r["mismatch_kl"] < 1e-8 and r["is_masked_fraction"] == r["is_truncated_fraction"] == 0.0, r
        assert abs(r["is_weight_mean"] - 1.0) < 1e-4 and abs(r["is_weight_max"] - 1.0) < 1e-4, r
        assert all(r[k] >= 0 for k in ("seconds_rollout", "seconds_old_pass", "seconds_update", "seconds_sync"))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_seconds"] > 0
    assert 0.0 <= summary["initial_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert (ckpt / "step_0000002" / "megafork_checkpoint.json").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]["tp"] == 2
    assert list(run_dir.glob("events.out.tfevents.*")), "tensorboard events expected"


# Depend on the machine's clock, not on the run's state.
_TIMING = ("seconds_", "tokens_per_second")


# Issue 12's layout metrics, in every row.
LAYOUT_KEYS = {"pad_fraction", "dp_token_imbalance", "microbatches_per_rank", "max_microbatch_tokens"}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed_balanced"])
def test_resume_is_bit_exact_at_dp2(tmp_path, packing):
    hf, train, heldout = _write_data(tmp_path)
    layout = {"max_tokens_per_microbatch": 24, "dp_balance": "kk"} if packing else {}
    common = dict(algo={"n": 4}, data={"reward": "megafork.testing.rewards:has_digit"}, optim={"lr": 1e-2},
                  train={"steps": 4, "save_every": 2, **layout}, eval={"every": 2})
    straight = _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "straight"}, **common)
    split = _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "split"}, **common)
    resumed = _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "split"},
                      **{**common, "train": {**common["train"], "resume": "auto"}})

    want = run_ranks(loop_worker, 2, args=(straight, 0), init_process_group=False, timeout=300)[0]
    assert run_ranks(loop_worker, 2, args=(split, 2), init_process_group=False, timeout=300) == [None, None]
    assert [r["step"] for r in _rows(tmp_path / "runs" / "split")] == [0, 1, 2]
    got = run_ranks(loop_worker, 2, args=(resumed, 0), init_process_group=False, timeout=300)[0]

    a, b = _rows(tmp_path / "runs" / "straight"), _rows(tmp_path / "runs" / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    a, b = a[1:], b[1:]
    # The test is only meaningful if the updates move the weights.
    assert any(0.0 < r["accuracy"] < 1.0 for r in a)
    assert all(r["grad_norm"] > 0 and r["loss"] != 0 for r in a), [(r["grad_norm"], r["loss"]) for r in a]
    for r in a:
        assert LAYOUT_KEYS <= set(r), sorted(LAYOUT_KEYS - set(r))
        assert 0.0 <= r["pad_fraction"] < 1.0 and r["dp_token_imbalance"] >= 1.0 and r["microbatches_per_rank"] >= 2
        if packing:  # rows of at most 24 tokens (every sequence here is shorter), almost no padding
            assert r["max_microbatch_tokens"] <= 24 and r["pad_fraction"] < 0.05, r
            assert r["dp_token_imbalance"] < 1.1, r
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for key, value in ra.items():
            if key.startswith(_TIMING) or not isinstance(value, int | float):
                continue
            assert value == rb[key] or (value != value and rb[key] != rb[key]), \
                f"step {ra['step']}: {key} straight {value!r} vs resumed {rb[key]!r}"
    assert {k: want[k] for k in ("initial_accuracy", "final_accuracy", "steps")} == \
        {k: got[k] for k in ("initial_accuracy", "final_accuracy", "steps")}



def test_pp2_loop_matches_one_process(tmp_path):
    """The loop at PP=2 (1F1B, rank 0 on the first stage) reports what a single process computes."""
    hf, train, heldout = _write_data(tmp_path)
    common = dict(algo={"n": 4}, data={"reward": "megafork.testing.rewards:has_digit"}, optim={"lr": 1e-2},
                  train={"steps": 2, "save_every": 0}, eval={"every": 0})
    one = _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "one"}, **common)
    pp2 = _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "pp2"},
                  parallel={"tp": 1, "pp": 2, "backend": "gloo"}, **common)
    run_ranks(loop_worker, 1, args=(one, 0), init_process_group=False, timeout=300)
    run_ranks(loop_worker, 2, args=(pp2, 0), init_process_group=False, timeout=300)

    a, b = _rows(tmp_path / "runs" / "one")[1:], _rows(tmp_path / "runs" / "pp2")[1:]
    assert len(a) == len(b) == 2
    for rb in b:  # token statistics come from the last stage, logged by rank 0 on the first
        assert rb["entropy_threshold"] == rb["entropy_p80"], rb["entropy_threshold"]
        assert rb["logprob_gap"] < 1e-4  # the export visits both stages: the engine has the trained weights
    ra, rb = a[0], b[0]  # step 1: same rollouts, so the same batch through both layouts
    assert ra["grad_norm"] > 0 and ra["selected_count"] == rb["selected_count"]
    for key in ("loss", "grad_norm", "entropy_threshold", "entropy_p50", "clip_fraction_low", "logprob_gap"):
        assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (key, ra[key], rb[key])

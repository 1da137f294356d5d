"""The trainer's SGLang path end to end: `torchrun -m megafork train` (TP=2) against `megafork serve`.

    .venv/bin/python -m pytest tests/test_train_sglang.py -q

A real `megafork serve` subprocess serves the tiny random Qwen3 on a free port. The trainer runs
2 steps with `rollout.engine=sglang`: rank 0 generates over HTTP `/generate` and, after every
step, broadcasts the new weights to the server over the gloo weight-update group
(`/init_weights_update_group` + `/update_weights_from_distributed`), with per-tensor checksums
verified by the trainer (`rollout.weight_sync_checksum=true`). The reward ("does the response
contain a digit?") makes about half of the random model's answers right, so step 1 really moves
the weights; step 2's `logprob_gap` is then only small if the server sampled step 2 with the
weights synced after step 1.

The reward must be importable in the torchrun processes (one registered in this pytest process
alone would be unknown to them), so the config names it as `megafork.testing.rewards:has_digit`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from megafork.rollout import launch_servers, stop_servers
from megafork.rollout.buckets import tensor_checksum
from megafork.rollout.httpjson import request_json
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_double_prompts, write_sum_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_sglang")
    make_tiny_qwen3(root / "hf", seed=0)
    write_sum_prompts(root / "train.jsonl", 6)
    write_double_prompts(root / "heldout.jsonl", 4)
    cfg = {
        "model": {"hf_path": str(root / "hf"), "dtype": "float32", "head_chunk_tokens": 64},
        "parallel": {"tp": 2, "pp": 1, "backend": "gloo"},
        "rollout": {"max_response_len": 6, "batch_size": 64, "engine": "sglang"},
        "algo": {"n": 4, "overlong_shaping": False, "dynamic_sampling": False},
        "forking": {"ratio": 0.2, "mode": "top", "scope": "step"},
        "data": {"train_path": str(root / "train.jsonl"), "reward": "megafork.testing.rewards:has_digit",
                 "max_prompt_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 2, "prompts_per_step": 4, "minibatch_prompts": 2, "micro_batch_size": 2,
                  "save_every": 0, "resume": "none", "seed": 3},
        "eval": {"path": str(root / "heldout.jsonl"), "every": 0, "k": 2, "temperature": 1.0, "top_p": 1.0},
        "log": {"run_name": "run", "dir": str(root / "runs"), "tensorboard": False, "progress_bar": False},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def server(workdir):
    """One `megafork serve` of the starting checkpoint; stopped (SIGTERM, then SIGKILL) at teardown."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork", "serve", "--model", str(workdir / "hf"), "--port", str(port),
           "--device", "cpu", "--threads", "1", "--log-level", "WARNING", "--weight-sync-timeout", "120"]
    procs = launch_servers([cmd], [url], timeout_s=120)
    yield url
    stop_servers(procs)


def _train(workdir: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megafork",
         "train", "--config", str(workdir / "run.yaml"), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_steps_through_megafork_serve_at_tp2(workdir, server):
    hf_sums = {n: tensor_checksum(t) for n, t in load_file(str(workdir / "hf" / "model.safetensors")).items()}
    before = request_json(server, "/get_weights_checksum")[1]
    # The server starts from the trainer's starting weights (it also lists the tied lm_head.weight).
    assert {n: before["checksums"].get(n) for n in hf_sums} == hf_sums

    proc = _train(workdir, f"rollout.sglang_urls={server}", "rollout.weight_sync_checksum=true",
                  "log.run_name=sglang")
    out = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, out
    run_dir = workdir / "runs" / "sglang"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2], rows  # row 0: held-out accuracy of the starting model
    steps = rows[1:]
    for r in steps:
        assert r["groups_kept"] == 4 and r["response_len_mean"] > 0, r
        assert r["seconds_sync"] > 0, r
    # Step 1 must change the weights, or step 2's small gap would prove nothing.
    assert any(0.0 < r["accuracy"] < 1.0 for r in steps), [r["accuracy"] for r in steps]
    assert steps[0]["grad_norm"] > 0 and steps[0]["loss"] != 0, steps[0]
    # Step 1 samples the checkpoint the server loaded; step 2 samples what the trainer synced after step 1.
    assert steps[0]["logprob_gap"] < 1e-4, steps[0]["logprob_gap"]
    assert steps[1]["logprob_gap"] < 1e-4, steps[1]["logprob_gap"]

    after = request_json(server, "/get_weights_checksum")[1]
    assert after["weight_version"] == "2", after["weight_version"]  # the sync after the last step landed
    assert set(after["checksums"]) == set(before["checksums"])
    changed = [n for n in hf_sums if after["checksums"][n] != hf_sums[n]]
    assert changed, "the server still serves the starting weights"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_accuracy"] is not None


def test_fresh_runs_resync_a_server_an_earlier_run_trained(workdir, server):
    """Two fresh runs in sequence against one server: the second must not sample the first's weights."""
    hf_sums = {n: tensor_checksum(t) for n, t in load_file(str(workdir / "hf" / "model.safetensors")).items()}
    runs = {}
    for name in ("fresh_a", "fresh_b"):
        served = request_json(server, "/get_weights_checksum")[1]
        proc = _train(workdir, f"rollout.sglang_urls={server}", "train.steps=1", f"log.run_name={name}")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        rows = [json.loads(line) for line in (workdir / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (served, rows, proc.stderr)
    served_b, rows_b, err_b = runs["fresh_b"]
    _, rows_a, _ = runs["fresh_a"]
    # Run A trained the server's weights: run B started against a stale engine, and was told so.
    assert served_b["weight_version"] == "1", served_b["weight_version"]
    assert any(served_b["checksums"][n] != s for n, s in hf_sums.items())
    assert "served other weights than this run starts from" in err_b, err_b[-4000:]
    # ...and still evaluated and sampled its own starting weights.
    assert rows_a[0]["step"] == rows_b[0]["step"] == 0
    assert rows_a[0]["eval_accuracy"] == rows_b[0]["eval_accuracy"], (rows_a[0], rows_b[0])
    assert rows_a[1]["logprob_gap"] < 1e-5 and rows_b[1]["logprob_gap"] < 1e-5, (rows_a[1], rows_b[1])
    assert rows_a[1]["accuracy"] == rows_b[1]["accuracy"] and rows_a[1]["loss"] == rows_b[1]["loss"]


def test_dead_url_fails_fast_naming_it(workdir):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    proc = _train(workdir, f"rollout.sglang_urls={dead}", "log.run_name=dead", timeout=120)
    elapsed = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert dead in out, out[-4000:]
    assert not (workdir / "runs" / "dead" / "metrics.jsonl").exists()
    assert elapsed < 60, elapsed

"""`train.rollout_ahead: 1` through a real `megafork serve`: staleness, versions, resume, learning.

    .venv/bin/python -m pytest tests/test_rollout_ahead.py -q

One `megafork serve` subprocess serves the tiny model on a free port, behind a `ReplayProxy`
(megafork/testing/replay_proxy.py) that forwards everything and records `/generate` answers.
The trainer runs the loop on 2 gloo ranks (DP=2), rank 0 generating the next step from a
background thread while both ranks train.

* A straight 4-step run: the first step trains on fresh samples (staleness 0), every later one on
  samples of the weights one version older (staleness exactly 1, mean and max), the weight
  versions the samples report advance 0, 0, 1, 2, and the server ends at version 4.
* Resume: the same run killed right after its step-2 checkpoint (step 3's batch had been
  generated in the background by then, and the killed run's weight-update group is still open on
  the server) and resumed. The resumed run regenerates the batch that
  was in flight at the checkpoint from the checkpointed sampler state; with the server's
  answers replayed for identical requests ("the same server outputs"), every request it makes is
  one the straight run made, and steps 3-4 log exactly the straight run's metrics.
* Learning: 20 steps on the demo task (one-digit sums after a warm start of a few seconds) with
  token TIS, every step sampling all 40 training prompts 8 times; the rollout accuracy of the
  last 5 steps beats the first 5 by more than 5 points.
* Config: the embedded engine is an error at load; no correction is a warning.
"""
from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest

from megafork.rollout import launch_servers, stop_servers
from megafork.rollout.httpjson import request_json
from megafork.rollout.types import RolloutError
from megafork.testing import run_ranks
from megafork.testing.loop_worker import loop_worker
from megafork.testing.multirank import free_port
from megafork.testing.replay_proxy import ReplayProxy
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_sum_prompts
from megafork.train.config import load_config
from megafork.train.config_types import ConfigError

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds_", "tokens_per_second")


def _serve(model_dir: Path, attempts: int = 3):
    """`megafork serve` on a free port (retried when another process takes the port first)."""
    for attempt in range(attempts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "megafork", "serve", "--model", str(model_dir), "--port", str(port),
               "--device", "cpu", "--threads", "1", "--log-level", "WARNING", "--weight-sync-timeout", "120"]
        try:
            return url, launch_servers([cmd], [url], timeout_s=120)
        except RolloutError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random Qwen3, prompts, a served copy behind a recording proxy, and the run config."""
    root = tmp_path_factory.mktemp("ahead")
    make_tiny_qwen3(root / "hf", seed=0)
    write_sum_prompts(root / "train.jsonl", 6)
    url, procs = _serve(root / "hf")
    proxy = ReplayProxy(url).start()
    cfg = {
        "model": {"hf_path": str(root / "hf"), "dtype": "float32", "head_chunk_tokens": 64},
        "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},  # DP=2 on 2 ranks
        "rollout": {"max_response_len": 6, "engine": "sglang", "sglang_urls": [proxy.url]},
        "algo": {"n": 4, "overlong_shaping": False, "dynamic_sampling": False, "rollout_correction": "token_tis"},
        "data": {"train_path": str(root / "train.jsonl"), "reward": "megafork.testing.rewards:has_digit",
                 "max_prompt_len": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 4, "prompts_per_step": 4, "minibatch_prompts": 2, "micro_batch_size": 2,
                  "save_every": 2, "resume": "none", "seed": 3, "rollout_ahead": 1},
        "log": {"dir": str(root / "runs"), "tensorboard": False, "progress_bar": False},
    }
    yield root, proxy, url, cfg
    proxy.stop()
    stop_servers(procs)


def test_staleness_versions_and_resume(tiny):
    root, proxy, url, cfg = tiny
    run_ranks(loop_worker, 2, args=(_named(cfg, "straight"), 0), init_process_group=False, timeout=400)
    straight = _rows(root / "runs" / "straight")
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert straight[0]["staleness_mean"] == straight[0]["staleness_max"] == 0.0
    for r in straight[1:]:
        assert r["staleness_mean"] == r["staleness_max"] == 1.0, r
    assert [r["rollout_weight_version"] for r in straight] == [0.0, 0.0, 1.0, 2.0]
    assert request_json(url, "/get_weights_checksum")[1]["weight_version"] == "4"
    # The stale steps train on samples of other weights: the correction has something to correct.
    assert all(r["mismatch_kl"] > 0 and r["is_weight_mean"] != 1.0 for r in straight[1:]), straight
    assert all(r["seconds_rollout_wait"] >= 0 for r in straight)
    assert straight[0]["grad_norm"] > 0 and any(0.0 < r["accuracy"] < 1.0 for r in straight)

    split = _named(cfg, "split")
    assert run_ranks(loop_worker, 2, args=(split, 2), init_process_group=False, timeout=400) == [None, None]
    # The killed job left its weight-update group open on the server: the resumed trainer destroys
    # it before creating its own (a plain init of that name would get a 400).
    proxy.replay, proxy.requests = True, []
    split["train"]["resume"] = "auto"
    run_ranks(loop_worker, 2, args=(split, 0), init_process_group=False, timeout=400)
    assert len(proxy.requests) >= 2 and proxy.hits == len(proxy.requests), \
        f"the resumed run asked {len(proxy.requests) - proxy.hits} requests the straight run never made"
    resumed = _rows(root / "runs" / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for want, got in zip(straight[2:], resumed[2:], strict=True):
        same = {k: v for k, v in want.items() if not k.startswith(TIMING) and "per_s" not in k}  # clock rates
        assert {k: got.get(k) for k in same} == same


def _named(cfg: dict, name: str) -> dict:
    out = copy.deepcopy(cfg)
    out["log"]["run_name"] = name
    return out


def test_embedded_engine_is_a_config_error_and_no_correction_warns():
    with pytest.raises(ConfigError, match="train.rollout_ahead: expected 0 with rollout.engine='embedded'"):
        load_config(None, ["train.rollout_ahead=1"])
    with pytest.raises(ConfigError, match="train.rollout_ahead"):
        load_config(None, ["train.rollout_ahead=2"])
    sglang = ["rollout.engine=sglang", "rollout.sglang_urls=http://127.0.0.1:1", "train.rollout_ahead=1"]
    with pytest.warns(UserWarning, match="algo.rollout_correction"):
        load_config(None, sglang)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, [*sglang, "algo.rollout_correction=seq_tis"])


def test_learns_on_the_demo_task_one_step_ahead(tmp_path):
    """20 steps, rollout_ahead=1 with token TIS through megafork serve: rollout accuracy goes up."""
    from megafork.demo.prepare import DemoSetup, prepare_demo
    from megafork.demo.sft import SFTConfig

    # The demo's task at its easiest level (one-digit sums) with a warm start of seconds, not minutes.
    sft = SFTConfig(steps=400, batch_size=32, lr=3e-3, warmup=10, target_accuracy=0.3, check_every=10,
                    train_problems=70, heldout_problems=30)
    demo = prepare_demo(tmp_path / "demo", DemoSetup(difficulty=1, rl_train_problems=40, sft=sft),
                        log=lambda line: None)
    url, procs = _serve(demo["hf_sft"])
    try:
        cfg = {
            "model": {"hf_path": str(demo["hf_sft"]), "dtype": "float32", "head_chunk_tokens": 1024},
            "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},
            "rollout": {"max_response_len": 8, "engine": "sglang", "sglang_urls": [url], "max_inflight_per_server": 4},
            "algo": {"n": 8, "overlong_shaping": False, "dynamic_sampling": False, "rollout_correction": "token_tis"},
            "data": {"train_path": str(demo["train_path"]), "reward": "dapo", "max_prompt_len": 32},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0, "adam_beta2": 0.99},
            "train": {"steps": 20, "prompts_per_step": 40, "minibatch_prompts": 20, "micro_batch_size": 40,
                      "save_every": 0, "resume": "none", "seed": 1234, "rollout_ahead": 1},
            "log": {"dir": str(tmp_path / "runs"), "run_name": "learn", "tensorboard": False, "progress_bar": False},
        }
        run_ranks(loop_worker, 1, args=(cfg, 0), init_process_group=False, timeout=900)
    finally:
        stop_servers(procs)
    rows = _rows(tmp_path / "runs" / "learn")
    assert len(rows) == 20 and all(r["staleness_max"] == 1.0 for r in rows[1:])
    first, last = (sum(r["accuracy"] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    assert last > first + 0.05, [round(r["accuracy"], 3) for r in rows]

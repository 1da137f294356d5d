"""The trainer at DP=2 waits out a rollout longer than its collective timeout, and syncs weights
through a host name.

    .venv/bin/python -m pytest tests/test_train_rollout_wait.py -q

`torchrun --nproc_per_node=2 -m megafork train` (TP=1, so DP=2) against a real `megafork serve`
HTTP server over the tiny Qwen3 that sleeps 40 s before every generation
(`python -m megafork.testing.synthetic_serve --model HF --delay-s 20`). The default process
group's timeout is 30 s (`parallel.timeout_minutes=0.5`): had rank 1 waited for rank 0's rollout
inside a collective of that group, it would have timed out. It waits on the gloo control plane
(`rollout.step_timeout_minutes`) instead. The weight-update group's master address is this
machine's host name (`rollout.weight_sync_master_addr`), not 127.0.0.1, and the per-tensor
checksums of the sync are verified.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from megafork.rollout import launch_servers, stop_servers
from megafork.rollout.httpjson import request_json
from megafork.testing.multirank import free_port
from megafork.testing.tiny_qwen3 import make_tiny_qwen3

REPO = Path(__file__).resolve().parents[1]
DELAY_S = 40.0


def test_dp2_waits_out_a_slow_rollout_and_syncs_via_the_host_name(tmp_path):
    make_tiny_qwen3(tmp_path / "hf", seed=0)
    with (tmp_path / "train.jsonl").open("w") as f:
        for a in range(6):
            f.write(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "megafork.testing.synthetic_serve", "--model", str(tmp_path / "hf"), "--port",
           str(port), "--delay-s", str(DELAY_S)]
    procs = launch_servers([cmd], [url], timeout_s=120)
    try:
        cfg = {
            "model": {"hf_path": str(tmp_path / "hf"), "dtype": "float32", "head_chunk_tokens": 64},
            "parallel": {"tp": 1, "pp": 1, "backend": "gloo", "timeout_minutes": 0.5},
            "rollout": {"max_response_len": 4, "engine": "sglang", "sglang_urls": [url], "step_timeout_minutes": 5,
                        "weight_sync_master_addr": socket.gethostname(), "weight_sync_checksum": True,
                        "request_timeout_s": 120},
            "algo": {"n": 2, "overlong_shaping": False, "dynamic_sampling": False},
            "data": {"train_path": str(tmp_path / "train.jsonl"), "reward": "dapo", "max_prompt_len": 16},
            "optim": {"lr": 1e-2, "warmup_steps": 0},
            "train": {"steps": 1, "prompts_per_step": 2, "minibatch_prompts": 2, "micro_batch_size": 2,
                      "save_every": 0, "resume": "none", "seed": 3},
            "log": {"run_name": "wait", "dir": str(tmp_path / "runs"), "tensorboard": False, "progress_bar": False},
        }
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "megafork",
             "train", "--config", str(tmp_path / "run.yaml")],
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
        out = proc.stdout[-4000:] + proc.stderr[-6000:]
        assert proc.returncode == 0, out
        (row,) = [json.loads(line) for line in (tmp_path / "runs" / "wait" / "metrics.jsonl").read_text().splitlines()]
        assert row["seconds_rollout"] > 30.0, row  # longer than the default group's timeout
        assert row["groups_kept"] == 2, row
        served = request_json(url, "/get_weights_checksum", timeout_s=30)[1]
        assert served["weight_version"] == "1", served  # the sync after the step reached the server
    finally:
        stop_servers(procs)

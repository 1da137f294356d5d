"""`make gpu-check`'s logic, rehearsed on CPU: the steps run, the report is written, time is checked.

    .venv/bin/python -m pytest tests/test_gpu_check.py -q

The GPU itself is checked by `make gpu-check` on a GPU machine (tools/gpu_check.py); here the same
script runs with `--device cpu --quick` (the fast device tests, small benchmark sizes).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_rehearsal_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check (cpu): PASSED" in proc.stdout and "Fused policy head fwd+bwd" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and report["pytest"]["rc"] == 0 and report["bench"]["rc"] == 0
    summary = report["pytest"]["summary"]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
    assert report["sizes"] == "small" and report["skipped"] == []
    rows = report["fused_head"]
    assert [(r["T"], r["rho"]) for r in rows] == [(256, 1.0), (256, 0.2), (512, 1.0), (512, 0.2)]
    assert all(r["fused_s"] > 0 and r["naive_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert report["radix"]["exact"] is True and report["radix"]["N"] == 1 << 18
    assert report["megatron"]["step_s"] > 0 and report["megatron"]["tokens"] == 256
    assert {t["target"] for t in report["targets"]} >= {"radix threshold <= torch.topk"}


def test_bench_past_its_deadline_skips_parts_but_still_writes(tmp_path, monkeypatch):
    import torch

    from bench import bench_gpu

    monkeypatch.setenv("MEGAFORK_CHECK_DEADLINE", str(time.time() - 1))
    out = tmp_path / "partial.json"
    results = bench_gpu.run(torch.device("cpu"), out)
    assert [s["part"] for s in results["skipped"]] == ["fused_head", "radix", "megatron"]
    written = json.loads(out.read_text())
    assert written["skipped"] == json.loads(json.dumps(results["skipped"])) and "fused_head" not in written
    assert all(s["seconds_left"] < 0 for s in written["skipped"])


def test_gpu_wheels_are_the_closure_beyond_torch():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import gpu_wheels
    finally:
        sys.path.pop(0)
    pins = gpu_wheels.wanted("3.12")
    for needed in ("megatron-core", "transformers", "tokenizers", "safetensors", "huggingface-hub", "pybind11",
                   "pyyaml", "tqdm", "psutil", "numpy", "pytest"):
        assert needed in pins, needed
    # the image's torch and its heavy requirements are never fetched (no CUDA torch download);
    # its small pure-python ones are, in case the image's are too old
    for provided in ("torch", "triton", "sympy", "networkx", "mpmath"):
        assert provided not in pins, provided
    assert {"typing-extensions", "filelock", "setuptools"} <= set(pins)
    assert all(v[0].isdigit() for v in pins.values()), pins  # pinned to what this venv tests with

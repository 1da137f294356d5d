"""The ablation runner at a tiny size: 2 rows x 2 seeds x 2 steps through the real trainer CLI.

    .venv/bin/python -m pytest tests/test_ablation.py -q

Checks the summary's fields, that its table is computed from the runs' own summary.json files,
and that a second call skips every finished run.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from megafork.demo import ablation
from megafork.testing.tiny_qwen3 import make_tiny_qwen3
from megafork.testing.toy_prompts import write_double_prompts, write_sum_prompts


def _tiny_config(root: Path) -> Path:
    hf = make_tiny_qwen3(root / "hf", seed=0)
    train, heldout = root / "train.jsonl", root / "heldout.jsonl"
    write_sum_prompts(train, 5)
    write_double_prompts(heldout, 4)
    cfg = {
        "model": {"hf_path": str(hf), "dtype": "float32", "head_chunk_tokens": 64},
        "parallel": {"tp": 1, "pp": 1, "backend": "gloo"},
        "rollout": {"max_response_len": 4, "batch_size": 64},
        "algo": {"n": 4, "overlong_shaping": False, "dynamic_sampling": False},
        "data": {"train_path": str(train), "reward": "megafork.testing.rewards:has_digit", "max_prompt_len": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0},
        "train": {"steps": 2, "prompts_per_step": 4, "minibatch_prompts": 4, "micro_batch_size": 4,
                  "save_every": 0, "seed": 3},
        "eval": {"path": str(heldout), "every": 1, "k": 2, "temperature": 1.0, "top_p": 1.0},
        "log": {"run_name": "x", "dir": str(root / "runs"), "tensorboard": False, "progress_bar": False},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ablation_runner_summary_table_and_resume(tmp_path, monkeypatch):
    config = _tiny_config(tmp_path)
    out = tmp_path / "abl"
    rows = ablation.parse_rows("all,top20")
    lines = []
    result = ablation.run_ablation(rows, seeds=2, steps=2, out=out, nproc=1, config=str(config), log=lines.append)
    assert any("4 runs to go" in line and "expected" in line for line in lines)

    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == 2 and written["seeds"] == [1, 2]
    assert {(r["row"], r["seed"]) for r in written["runs"]} == {("all", 1), ("all", 2), ("top20", 1), ("top20", 2)}
    for name in ("all", "top20"):
        runs = [json.loads((out / f"{name}-seed{s}" / "summary.json").read_text()) for s in (1, 2)]
        gains = [r["final_accuracy"] - r["initial_accuracy"] for r in runs]
        row = written["rows"][name]
        assert row["seeds"] == [1, 2]
        assert row["gain_mean"] == pytest.approx(statistics.fmean(gains), abs=1e-12)
        assert row["gain_sd"] == pytest.approx(statistics.stdev(gains), abs=1e-12)
        assert len({r["final_accuracy"] for r in runs} | {r["initial_accuracy"] for r in runs}) > 1  # not all equal
        assert row["final_mean"] == pytest.approx(statistics.fmean(r["final_accuracy"] for r in runs), abs=1e-12)
        curves = [r["curve"] for r in written["runs"] if r["row"] == name]
        assert [[s for s, _ in c] for c in curves] == [[0, 1, 2]] * 2, curves  # initial eval + eval.every=1
        # The row really ran with its overrides: the resolved config of each run says so.
        resolved = yaml.safe_load((out / f"{name}-seed1" / "config.yaml").read_text())
        assert resolved["forking"]["mode"] == ("all" if name == "all" else "top")
        assert resolved["train"]["seed"] == 1
    table = (out / "ablation.md").read_text()
    assert table.strip() == written["table"].strip()
    assert f"{100 * written['rows']['top20']['gain_mean']:+.1f} ± {100 * written['rows']['top20']['gain_sd']:.1f}" \
        in table
    assert (out / "ablation.png").stat().st_size > 0
    assert result["rows"] == written["rows"]

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablation, "_train", must_not_train)
    lines.clear()
    again = ablation.run_ablation(rows, seeds=2, steps=2, out=out, nproc=1, config=str(config), log=lines.append)
    assert any("0 runs to go (4 finished, skipped)" in line for line in lines)
    assert again["rows"] == written["rows"]


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="--rows: expected a comma-separated subset"):
        ablation.parse_rows("all,top33")

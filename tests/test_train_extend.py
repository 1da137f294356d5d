"""Continuing a finished run with a longer schedule (`train.extend_steps`), and its wall-clock total.

    .venv/bin/python -m pytest tests/test_train_extend.py -q

A 2-step run finishes; the same run with `train.steps=4` refuses to resume (its LR schedule
changed) and names the key that allows it; with `train.extend_steps=true` it trains steps 3 and 4
from the step-2 checkpoint. The summary's `wall_seconds` then covers both processes, and
`wall_seconds_since_resume` only the second.
"""
from __future__ import annotations

import json
import math

import pytest
from test_train_loop import _config, _rows, _write_data

from megafork.testing import run_ranks
from megafork.testing.loop_worker import loop_worker
from megafork.testing.multirank import RankFailure


def test_finished_run_extends_with_a_new_schedule(tmp_path):
    hf, train, heldout = _write_data(tmp_path)
    common = dict(algo={"n": 4}, optim={"lr": 1e-2, "schedule": "cosine", "min_lr": 1e-3},
                  eval={"every": 0})

    def cfg(**train_keys):
        return _config(hf, train, heldout, tmp_path / "runs", log={"run_name": "ext"},
                       train={"steps": 2, "save_every": 2, "resume": "auto", **train_keys}, **common)

    (first,) = run_ranks(loop_worker, 1, args=(cfg(), 0), init_process_group=False, timeout=300)
    assert first["steps"] == 2 and first["wall_seconds"] == first["wall_seconds_since_resume"] > 0
    with pytest.raises(RankFailure, match=r"LR schedule differs .*decay steps 2 -> 4.*train.extend_steps=true"):
        run_ranks(loop_worker, 1, args=(cfg(steps=4), 0), init_process_group=False, timeout=300)

    (second,) = run_ranks(loop_worker, 1, args=(cfg(steps=4, extend_steps=True), 0), init_process_group=False,
                          timeout=300)
    rows = _rows(tmp_path / "runs" / "ext")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # A row's lr is the schedule after its step. The old schedule ended at min_lr; the new cosine over 4
    # steps after step 3: min_lr + (lr - min_lr) * (1 + cos(pi * 3/4)) / 2.
    assert rows[2]["lr"] == pytest.approx(1e-3)
    assert rows[3]["lr"] == pytest.approx(1e-3 + 9e-3 * (1 + math.cos(math.pi * 3 / 4)) / 2, rel=1e-6), rows[3]
    assert second["steps"] == 4 and second["initial_accuracy"] == first["initial_accuracy"]
    before = second["wall_seconds"] - second["wall_seconds_since_resume"]
    assert 0 < before <= first["wall_seconds"], (second, first)  # the first run's time up to its checkpoint
    assert json.loads((tmp_path / "runs" / "ext" / "summary.json").read_text())["wall_seconds"] == \
        second["wall_seconds"]

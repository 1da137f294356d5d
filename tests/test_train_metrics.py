"""MetricsLogger: metrics.jsonl rows, TensorBoard scalars, resume truncation, the forking-fraction warning."""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from megafork.analysis.io import METRIC_KEYS, read_metrics
from megafork.train.config import Config, ForkingConfig, LogConfig, TrainConfig
from megafork.train.metrics import MetricsLogger, Timer, check_selected_fraction, truncate_metrics


def _cfg(tmp_path, **forking) -> Config:
    return Config(log=LogConfig(run_name="r", dir=str(tmp_path), tensorboard=True, progress_bar=True),
                  train=TrainConfig(steps=5, prompts_per_step=4, minibatch_prompts=2),
                  forking=ForkingConfig(**forking))


def _row(i: int) -> dict:
    return {"reward_mean": 0.1 * i, "accuracy": np.float32(0.25), "entropy_p80": torch.tensor(1.5),
            "selected_fraction": 0.2, "selected_count": np.int64(7), "tokens_per_second": 100.0 + i}


def _tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_rows_tensorboard_and_resume_truncation(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = cfg.log.run_dir
    with MetricsLogger(run_dir, cfg) as log:
        for step in range(3):
            row = log.log(step, _row(step))
        assert row["step"] == 3 and row["accuracy"] == 0.25 and row["selected_count"] == 7
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["reward_mean"] == pytest.approx(0.1) and isinstance(rows[1]["entropy_p80"], float)
    assert set(rows[0]) <= set(METRIC_KEYS)

    # The interrupted run checkpointed after 2 steps and logged step 3 (plus half a line) before dying.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    with MetricsLogger(run_dir, cfg, start_step=2) as log:
        for step in range(2, 5):
            log.log(step, _row(10 + step))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["reward_mean"] == pytest.approx(1.2)  # the resumed run's step 3, not the dead one's
    assert rows[1]["reward_mean"] == pytest.approx(0.1)

    scalars = _tb_scalars(run_dir)
    assert {"reward_mean", "accuracy", "entropy_p80", "selected_fraction", "tokens_per_second"} <= set(scalars)
    steps = [s for s, _ in scalars["reward_mean"]]
    assert steps == [1, 2, 3, 4, 5]  # purge_step dropped the dead run's step 3
    assert dict(scalars["reward_mean"])[3] == pytest.approx(1.2)


def test_step_disagreement_and_bad_values(tmp_path):
    cfg = _cfg(tmp_path)
    with MetricsLogger(cfg.log.run_dir, cfg) as log:
        log.log(0, {"step": 1, "lr": 1e-3})
        with pytest.raises(ValueError, match=r"metrics\['step'\] = 0: expected step \+ 1 = 1"):
            log.log(0, {"step": 0})
        with pytest.raises(ValueError, match="metric 'entropy': expected a scalar"):
            log.log(1, {"entropy": torch.zeros(3)})
    with pytest.raises(ValueError, match="total_steps is required"):
        MetricsLogger(tmp_path / "x", LogConfig())


def test_fraction_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="megafork.train.metrics")
    cfg = _cfg(tmp_path, ratio=0.2, mode="top")
    with MetricsLogger(cfg.log.run_dir, cfg) as log:
        log.log(0, {"selected_fraction": 0.24})
        assert not caplog.records
        log.log(1, {"selected_fraction": 1.0})
    (rec,) = caplog.records
    assert "step 2" in rec.message and "1.0000" in rec.message and "0.2000" in rec.message
    caplog.clear()
    assert check_selected_fraction(0.7, ForkingConfig(ratio=0.2, mode="all"))  # plain DAPO: no check
    assert not check_selected_fraction(0.12, ForkingConfig(ratio=0.2, mode="bottom"))
    assert "0.1200" in caplog.records[0].message


def test_other_ranks_and_truncate(tmp_path):
    log = MetricsLogger(tmp_path / "r1", LogConfig(), total_steps=3, enabled=False)
    assert log.log(0, {"reward_mean": 1.0}) == {}
    log.close()
    assert not (tmp_path / "r1").exists()
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    assert truncate_metrics(p, 2) == 2
    assert [r["step"] for r in read_metrics(p)] == [1, 2]


def test_timer():
    timer = Timer()
    with timer("rollout"):
        time.sleep(0.02)
    with timer("rollout"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), timer("update"):
        raise RuntimeError("phase failed")
    assert timer.seconds["rollout"] >= 0.03 and "update" in timer.seconds
    assert set(timer.as_metrics()) == {"seconds_rollout", "seconds_update"}
    assert set(timer.as_metrics()) <= set(METRIC_KEYS)


def test_resume_truncation_says_which_steps_and_eval_logs_progress(tmp_path, caplog):
    from megafork.train.metrics import eval_progress

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
    with caplog.at_level(logging.INFO, logger="megafork.train.metrics"):
        MetricsLogger(run, LogConfig(tensorboard=False, progress_bar=False), total_steps=4, start_step=2).close()
    assert "removed 1 line(s) of steps after 2 (logged after the checkpoint of step 2" in caplog.text, caplog.text
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]

    caplog.clear()
    cfg = Config.from_dict({"eval": {"k": 4, "max_prompts": 10}})
    with caplog.at_level(logging.INFO, logger="megafork.train.metrics"):
        with eval_progress(cfg, 256, step=3) as done:
            assert "eval at step 3: avg@4 over 10 held-out prompts (40 responses) ..." in caplog.text
            assert done(0.375) == 0.375
    assert "eval at step 3: accuracy 0.3750 in " in caplog.text

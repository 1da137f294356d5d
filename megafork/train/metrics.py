"""Per-step metrics: `metrics.jsonl`, TensorBoard events, a progress bar, and the forking-option check.

    log = MetricsLogger(cfg.log.run_dir, cfg, start_step=steps_done)   # steps_done: from the checkpoint
    for step in range(steps_done, cfg.train.steps):                   # 0-based loop index
        timer = Timer()
        with timer("rollout"):
            ...
        log.log(step, {"reward_mean": r, "accuracy": a, "entropy_p80": h80, "selected_fraction": f,
                       "tokens_per_second": tps, **timer.as_metrics()})
    log.close()

Public API:
    MetricsLogger(run_dir, cfg, total_steps=None, start_step=0, forking=None, enabled=None)
        cfg: the run `Config` (total_steps and forking default to cfg.train.steps and cfg.forking)
             or just its `LogConfig` (then pass total_steps, and forking for the check)
        .log(step, metrics) -> dict      writes the row {"step": step + 1, **metrics}
        .close()
    eval_progress(cfg, num_prompts, step) -> context manager yielding done(accuracy)   (log lines)
    RunClock(started, before=0.0)       wall seconds across resumes
        .state() -> {"wall_seconds"}     kept in checkpoints
        .summary() -> {"wall_seconds", "wall_seconds_since_resume"}
    Timer()
        __call__(phase) -> context manager adding wall seconds to the phase
        .seconds -> dict[str, float]     {phase: seconds}
        .as_metrics() -> dict[str, float]  {"seconds_<phase>": seconds}
    check_selected_fraction(fraction, forking, step=None) -> bool   (False + warning when off)
    truncate_metrics(path, start_step) -> int

Step numbering: a row's "step" is the number of RL steps completed after it (1-based), the same
number a checkpoint saved right after that step carries (`step_0000002` follows row 2). `log` takes
the 0-based loop index and writes `step + 1`; a "step" entry in `metrics` must agree with that.
Resuming from a checkpoint of N completed steps (`start_step=N`) first rewrites metrics.jsonl
without the rows with step > N (written by the interrupted run after that checkpoint), so no step
appears twice; TensorBoard gets `purge_step=N + 1` for the same reason.

Keys follow `megafork.analysis.io.METRIC_KEYS` (so `megafork analyze` plots the run); other keys are
written too. `run_dir/metrics.jsonl` gets one JSON object per step, appended and flushed. TensorBoard
event files are written in `run_dir` itself, so `tensorboard --logdir runs/` lists one run per
directory, one scalar per numeric key.

Only one process logs: `enabled` defaults to global rank 0. On the other ranks every method is a
no-op, so the loop may call them unconditionally.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megafork.analysis.io import METRIC_ACCURACY, METRIC_KEYS, METRIC_REWARD

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FRACTION_TOLERANCE = 0.05  # 5 points: the "option is live" bound
# (metric key, progress-bar label, format)
_BAR_FIELDS = ((METRIC_REWARD, "reward", "{:.3f}"), (METRIC_ACCURACY, "acc", "{:.3f}"),
               ("entropy_p80", "H80", "{:.3f}"), ("selected_fraction", "sel", "{:.3f}"),
               ("tokens_per_second", "tok/s", "{:.0f}"))


def _plain(key: str, value):
    """JSON-ready scalar: python bool/int/float/str; 0-d tensors and numpy scalars are unwrapped."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, found a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, bool | int | float | str):  # numpy scalar
        value = value.item()
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metric {key!r}: expected a number, bool or string, found {type(value).__name__}")


def check_selected_fraction(fraction: float, forking, step: int | None = None) -> bool:
    """Warn when the selected fraction is more than 5 points from `forking.ratio` (mode != "all").

    This is how a run proves the forking option is live: a silently ignored ratio shows up as a
    fraction near 1.

    Args:
        fraction: selected tokens / response tokens of the step.
        forking: `megafork.train.config.ForkingConfig` (ratio, mode).
        step: for the message.

    Returns:
        True when the fraction is within tolerance (or mode is "all"), False after warning.
    """
    if forking.mode == "all":
        return True
    if abs(fraction - forking.ratio) <= FRACTION_TOLERANCE:
        return True
    where = "" if step is None else f"step {step}: "
    logger.warning("%sselected fraction %.4f differs from forking.ratio %.4f by more than %.2f (forking.mode=%r); "
                   "the forking option may not be reaching the loss", where, fraction, forking.ratio,
                   FRACTION_TOLERANCE, forking.mode)
    return False


def truncate_metrics(path: str | Path, start_step: int) -> int:
    """Rewrite a metrics.jsonl keeping only the rows with step <= start_step (atomic replace).

    A trailing line cut off by a kill is dropped. Returns the number of lines removed.

    Args:
        path: the metrics.jsonl file (nothing happens if it does not exist).
        start_step: steps completed by the checkpoint the run resumes from.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:line %d: unreadable metrics line dropped on resume: %r", p, lineno, line[:80])
            dropped += 1
            continue
        if isinstance(step, int) and step <= start_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, p)
    return dropped


class MetricsLogger:
    """Rank-0 writer of one metrics row per step (see the module docstring).

    Args:
        run_dir: the run directory (`cfg.log.run_dir`); created if needed.
        cfg: the run `Config`, or its `LogConfig` (tensorboard, progress_bar).
        total_steps: steps of the whole run (progress bar total, ETA); default `cfg.train.steps`.
        start_step: steps completed by the checkpoint resumed from (0 = fresh; rows after it are
            removed).
        forking: `ForkingConfig` for the selected-fraction check; default `cfg.forking` (None
            with a bare LogConfig: no check).
        enabled: log from this process; default: global rank 0 (or the only process).
    """

    def __init__(self, run_dir: str | Path, cfg, total_steps: int | None = None, start_step: int = 0,
                 forking=None, enabled: bool | None = None):
        log_cfg = getattr(cfg, "log", cfg)
        if total_steps is None:
            if not hasattr(cfg, "train"):
                raise ValueError("MetricsLogger: total_steps is required when cfg is a LogConfig")
            total_steps = cfg.train.steps
        if forking is None:
            forking = getattr(cfg, "forking", None)
        if enabled is None:
            enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.forking = forking
        self.total_steps = total_steps
        self.path = self.run_dir / METRICS_FILE
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = truncate_metrics(self.path, start_step)
        if removed:
            logger.info("%s: removed %d line(s) of steps after %d (logged after the checkpoint of step %d, which "
                        "this run resumes from)", self.path, removed, start_step, start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the logger
        if log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if start_step > 0 else None)
        if log_cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> dict:
        """Write the step's row: one JSON line (flushed), TensorBoard scalars, the progress bar.

        Args:
            step: the 0-based index of the step just finished; the row gets "step": step + 1.
            metrics: key -> number (python, numpy or 0-d tensor), bool or string.

        Returns:
            The row as written (empty dict on ranks that do not log).
        """
        if not self.enabled:
            return {}
        done = int(step) + 1
        if "step" in metrics and metrics["step"] != done:
            raise ValueError(f"metrics['step'] = {metrics['step']!r}: expected step + 1 = {done} (rows count steps "
                             f"completed), found a different value")
        row = {"step": done}
        row.update({k: _plain(k, v) for k, v in metrics.items() if k != "step"})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=done)
            self._tb.flush()
        if self.forking is not None and isinstance(row.get("selected_fraction"), float | int):
            check_selected_fraction(row["selected_fraction"], self.forking, done)
        if self._bar is not None:
            shown = {label: fmt.format(row[key]) for key, label, fmt in _BAR_FIELDS
                     if isinstance(row.get(key), int | float) and math.isfinite(row[key])}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return row

    def log_start(self, metrics: dict) -> dict:
        """Write row 0: the model before any step (e.g. its held-out accuracy). No bar update.

        Args:
            metrics: key -> number, as for `log`.
        """
        if not self.enabled:
            return {}
        row = {"step": 0, **{k: _plain(k, v) for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=0)
            self._tb.flush()
        return row

    def close(self) -> None:
        """Flush and close the file, the TensorBoard writer and the progress bar."""
        for thing in (self._file, self._tb, self._bar):
            if thing is not None:
                thing.close()
        self._file = self._tb = self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def eval_progress(cfg, num_prompts: int, step: int):
    """Log a held-out evaluation as it starts and ends (it can take minutes with no other output).

    Yields `done(accuracy) -> accuracy`, which logs the result and the seconds taken.

    Args:
        cfg: the run `Config` (`eval.k`, `eval.max_prompts`).
        num_prompts: prompts in the held-out set.
        step: steps completed (0 = the starting model).
    """
    count = num_prompts if cfg.eval.max_prompts == 0 else min(num_prompts, cfg.eval.max_prompts)
    logger.info("eval at step %d: avg@%d over %d held-out prompts (%d responses) ...", step, cfg.eval.k, count,
                count * cfg.eval.k)
    t0 = time.perf_counter()

    def done(accuracy):
        logger.info("eval at step %d: accuracy %.4f in %.1fs", step, accuracy, time.perf_counter() - t0)
        return accuracy

    yield done


class RunClock:
    """Wall-clock seconds of a run across resumes.

    A checkpoint carries the run's total at save time (`state()`); the resumed process adds its own
    seconds to it. Time an interrupted process spent after its last checkpoint is not counted: that
    work was redone.

    Args:
        started: `time.perf_counter()` when this process started the run.
        before: seconds of earlier processes, up to the checkpoint resumed from.
    """

    def __init__(self, started: float, before: float = 0.0):
        self.started = started
        self.before = float(before)

    def since_resume(self) -> float:
        return time.perf_counter() - self.started

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps: {"wall_seconds": total so far}, rank 0's on every rank.

        Call on every rank (it broadcasts): a checkpoint's `extra` must be equal on all of them.
        """
        box = [self.before + self.since_resume()]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return {"wall_seconds": box[0]}

    def summary(self) -> dict[str, float]:
        """{"wall_seconds": the run's total, "wall_seconds_since_resume": this process's part}."""
        now = self.since_resume()
        return {"wall_seconds": self.before + now, "wall_seconds_since_resume": now}


class Timer:
    """Wall-clock seconds per phase (summed when a phase is entered more than once).

    With CUDA, the device is synchronised at both ends so queued kernels count in their phase.
    """

    def __init__(self):
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            self._seconds[phase] = self._seconds.get(phase, 0.0) + time.perf_counter() - t0

    @property
    def seconds(self) -> dict[str, float]:
        """{phase: seconds} so far."""
        return dict(self._seconds)

    def as_metrics(self) -> dict[str, float]:
        """{"seconds_<phase>": seconds}: the metric keys of `megafork.analysis.io.METRIC_KEYS`."""
        return {f"seconds_{k}": v for k, v in self._seconds.items()}


__all__ = ["METRIC_KEYS", "MetricsLogger", "RunClock", "Timer", "eval_progress", "check_selected_fraction", "truncate_metrics"]

"""Where checkpoints live and what a complete one is: naming, `latest`, validation, resume paths, RNG state.

The on-disk layout is described in `megafork.train.checkpoint`, which saves and loads through
these helpers.
"""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("megafork.train.checkpoint")

META_FILE = "megafork_checkpoint.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^(step_\d+\.tmp-|step_\d+\.deleting-|step_\d+\.replaced-|latest\.tmp-)")


class CheckpointError(ValueError):
    """A checkpoint is missing, not a megafork checkpoint, incomplete or does not fit this run."""


def checkpoints_root(run_dir: str | Path) -> Path:
    """`run_dir/checkpoints`: where a run's checkpoints and the `latest` pointer live."""
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# --------------------------------------------------------------------------------------------------
# RNG state.

def capture_rng_state() -> dict:
    """Every RNG this process draws from: python `random`, numpy's global, torch CPU, and with CUDA
    the current device's generator and megatron's model-parallel CUDA RNG tracker."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`.

    Args:
        state: a dict from `capture_rng_state` (of this rank).

    Raises:
        CheckpointError: a CUDA state without CUDA here (or the reverse).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() != ("cuda" in state):
        raise CheckpointError(f"RNG state: expected {'a' if torch.cuda.is_available() else 'no'} CUDA generator "
                              f"state (CUDA available: {torch.cuda.is_available()}), found keys {sorted(state)}")
    if "cuda" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


# --------------------------------------------------------------------------------------------------
# Finding and validating checkpoints.

def validate_checkpoint(path: str | Path) -> dict:
    """Check that `path` is a complete megafork checkpoint and return its meta.

    Args:
        path: a `step_N` directory.

    Raises:
        CheckpointError: naming the path and what is wrong (missing, not a directory, not a
            megafork checkpoint, incomplete, unreadable meta).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: expected a checkpoint directory, found nothing at that path")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p}: expected a directory, found a file")
    meta_path = p / META_FILE
    if _TMP_RE.match(p.name):
        raise CheckpointError(f"checkpoint {p}: incomplete (a save that did not finish: its name has a "
                              f"temporary suffix); use a step_N directory or train.resume=auto")
    if not meta_path.is_file():
        if (p / "metadata.json").is_file():
            raise CheckpointError(f"checkpoint {p}: a megatron dist checkpoint but not a megafork training "
                                  f"checkpoint (no {META_FILE}); to start from model weights use "
                                  f"model.megatron_path instead of train.resume")
        raise CheckpointError(f"checkpoint {p}: not a megafork checkpoint (expected {META_FILE}, found "
                              f"{sorted(x.name for x in p.iterdir())[:10]})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {meta_path}: unreadable ({exc})") from exc
    for key in ("format_version", "step", "world_size", "model_keys", "has_optimizer_state"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {meta_path}: expected field {key!r}, found keys {sorted(meta)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {meta_path}: expected format_version {FORMAT_VERSION}, "
                              f"found {meta['format_version']}")
    missing = [f for f in ("metadata.json", ".metadata", "common.pt") if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {p}: incomplete, dist_checkpointing files {missing} are missing")
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first (temporary directories are skipped)."""
    r = Path(root)
    if not r.is_dir():
        return []
    found = []
    for p in r.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `root/latest` names; None when the run has none.

    If `latest` is absent or names a directory that is not a complete checkpoint (e.g. removed by
    hand), the newest complete `step_N` is used and a warning says so.

    Args:
        root: the checkpoints directory of a run (`checkpoints_root(run_dir)`).
    """
    r = Path(root)
    pointer = r / LATEST_FILE
    complete = list_checkpoints(r)
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = r / name
        try:
            validate_checkpoint(target)
            return target
        except CheckpointError as exc:
            fallback = complete[-1] if complete else None
            logger.warning("%s names %r, which is not usable (%s); using %s instead", pointer, name, exc,
                           fallback if fallback is not None else "no checkpoint (fresh start)")
            return fallback
    if complete:
        logger.warning("%s has checkpoints but no %r pointer; using the newest, %s", r, LATEST_FILE, complete[-1])
        return complete[-1]
    return None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """Turn `train.resume` into the checkpoint to load (None = start fresh).

    Args:
        resume: "auto" (the run's latest checkpoint if any, else fresh), "none" (always fresh), or
            a path: a `step_N` checkpoint directory, or a checkpoints directory holding `latest`.
        root: this run's checkpoints directory (used by "auto").

    Raises:
        CheckpointError: an explicit path that is missing, not a megafork checkpoint or incomplete.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    p = Path(resume)
    if p.is_dir() and (p / LATEST_FILE).is_file() and not (p / META_FILE).is_file():
        target = latest_checkpoint(p)
        if target is None:
            raise CheckpointError(f"train.resume={resume!r}: {p / LATEST_FILE} exists but no complete checkpoint "
                                  f"is in {p}")
        return target
    try:
        validate_checkpoint(p)
    except CheckpointError as exc:
        raise CheckpointError(f"train.resume={resume!r}: {exc}") from exc
    return p


# --------------------------------------------------------------------------------------------------
# Saving.

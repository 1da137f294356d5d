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
    _check_dist_files(p)
    return meta


def _check_dist_files(p: Path) -> None:
    """What can be checked without loading: metadata that parses, and every shard file the
    dist_checkpointing metadata points into present and long enough for its last byte range."""
    import zipfile

    try:
        backend = json.loads((p / "metadata.json").read_text())
        if not isinstance(backend, dict) or "sharded_backend" not in backend:
            raise ValueError(f"expected a JSON object with 'sharded_backend', found {backend!r:.80}")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {p / 'metadata.json'}: unreadable ({exc})") from exc
    if backend["sharded_backend"] == "torch_dist":
        from torch.distributed.checkpoint import FileSystemReader

        try:
            storage = FileSystemReader(str(p)).read_metadata().storage_data
        except Exception as exc:  # noqa: BLE001 - a truncated pickle raises anything from EOFError on
            raise CheckpointError(f"checkpoint {p / '.metadata'}: unreadable ({type(exc).__name__}: {exc})") from exc
        need: dict[str, int] = {}
        for info in storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(need.items()):
            f = p / name
            found = f.stat().st_size if f.is_file() else None
            if found is None or found < size:
                what = "no such file" if found is None else f"{found} bytes"
                raise CheckpointError(f"checkpoint {f}: expected at least {size} bytes (the end of its last shard "
                                      f"in {p / '.metadata'}), found {what}")
    try:  # torch.save's zip format: a truncated or damaged common.pt fails its directory or CRCs
        with zipfile.ZipFile(p / "common.pt") as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {p / 'common.pt'}: unreadable ({exc})") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {p / 'common.pt'}: damaged (CRC mismatch in {bad})")


def locate_damage(path: str | Path) -> str:
    """Name the file (and stored object) of a checkpoint that cannot be read, for a load that failed.

    Checks what `validate_checkpoint` checks, then unpickles every non-tensor object stored in the
    shard files (tensors are raw bytes and cannot fail to decode). Returns a sentence naming the
    damaged file, or saying that every file checks out.

    Args:
        path: the checkpoint directory.
    """
    import io

    p = Path(path)
    try:
        validate_checkpoint(p)
    except CheckpointError as exc:
        return str(exc)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = FileSystemReader(str(p)).read_metadata()
    for index, info in meta.storage_data.items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        f = p / info.relative_path
        with f.open("rb") as fh:
            fh.seek(info.offset)
            raw = fh.read(info.length)
        try:
            torch.load(io.BytesIO(raw), weights_only=False)  # checkpoints are trusted input (module doc)
        except Exception as exc:  # noqa: BLE001 - any decode failure marks the damage
            return (f"{f}: the object {index.fqn!r} at bytes {info.offset}..{info.offset + info.length} "
                    f"does not decode ({type(exc).__name__}: {exc})")
    return f"every file of {p} checks out (sizes and stored objects)"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoints under `root` whose save finished (they have the meta file), oldest step first.

    Temporary directories are skipped. A listed checkpoint may still be damaged; see
    `validate_checkpoint`.
    """
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
    """The newest usable checkpoint: the one `root/latest` names, else the newest valid `step_N`.

    A checkpoint that fails `validate_checkpoint` (files missing, truncated or unparsable) is
    skipped with a warning naming it, why, and the checkpoint used instead. Nothing is deleted:
    the broken directory stays for inspection.

    Args:
        root: the checkpoints directory of a run (`checkpoints_root(run_dir)`).

    Raises:
        CheckpointError: there are checkpoints but none is valid (each named with its problem).
    """
    r = Path(root)
    pointer = r / LATEST_FILE
    candidates = list(reversed(list_checkpoints(r)))
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named is not None:
        candidates = [r / named] + [c for c in candidates if c.name != named]
    elif candidates:
        logger.warning("%s has checkpoints but no %r pointer; using the newest valid one", r, LATEST_FILE)
    broken = []
    for c in candidates:
        try:
            validate_checkpoint(c)
        except CheckpointError as exc:
            broken.append((c, exc))
            continue
        if broken:
            logger.warning("%s; falling back to %s, the newest valid checkpoint (nothing was deleted)",
                           "; ".join(_why(b, e, named) for b, e in broken), c)
        return c
    if broken:
        raise CheckpointError(f"{r}: no valid checkpoint to resume from: "
                              f"{'; '.join(_why(b, e, named) for b, e in broken)}. Nothing was deleted; repair or "
                              "move them away, or start fresh with train.resume=none")
    return None


def _why(path: Path, exc: CheckpointError, named: str | None) -> str:
    by = f"{LATEST_FILE} names {path.name}, which" if path.name == named else f"{path}"
    return f"{by} is not usable ({exc})"


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

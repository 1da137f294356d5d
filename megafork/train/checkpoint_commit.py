"""Atomic publication of a save on the shared filesystem: fsyncs, the rename into place, `latest`, pruning.

Every rank writes into `step_N.tmp-<nonce>/`; rank 0 then publishes it (`_publish`) and failures on rank 0
reach every rank (`_raise_everywhere`). The protocol is described in `megafork.train.checkpoint`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from megafork.train.checkpoint_layout import _TMP_RE, FORMAT_VERSION, LATEST_FILE, META_FILE, list_checkpoints
from megafork.train.checkpoint_state import _layout, _megatron_version
from megafork.train.storage import StorageError

logger = logging.getLogger("megafork.train.checkpoint")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_str(text: str | None) -> str:
    if not dist.is_initialized():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)  # a directory fd can be fsynced on POSIX; makes renames/creations durable


def _remove_stale(root: Path, keep: set[str]) -> None:
    for p in root.iterdir():
        if _TMP_RE.match(p.name) and p.name not in keep:
            logger.info("removing leftover %s (from an interrupted save or prune)", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _prune(root: Path, keep_last: int, protect: Path, nonce: str) -> None:
    if keep_last <= 0:
        return
    complete = list_checkpoints(root)
    for old in complete[:-keep_last]:
        if old.resolve() == protect.resolve():
            continue
        doomed = old.with_name(f"{old.name}.deleting-{nonce}")
        os.rename(old, doomed)  # atomic: the checkpoint name disappears at once
        shutil.rmtree(doomed, ignore_errors=True)


def _raise_everywhere(failure: StorageError | None) -> None:
    """Rank 0's failure (or None) reaches every rank, which all raise it instead of waiting in a barrier."""
    message = _broadcast_str(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise StorageError("rank 0", message)


def _publish(root: Path, tmp: Path, final: Path, step: int, world: int, model_keys: list, has_opt_state: bool,
             scheduler, groups, nonce: str, keep_last: int, distributed: bool = False) -> None:
    """Rank 0: write the meta file, rename the save into place, repoint `latest`, prune."""
    meta = {
        "format_version": FORMAT_VERSION, "step": int(step), "world_size": world, "model_keys": model_keys,
        "has_optimizer_state": has_opt_state, "has_scheduler": scheduler is not None,
        "distributed_optimizer": distributed, "layout": _layout(groups),
        "megatron_core": _megatron_version(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for f in tmp.iterdir():
        if f.is_file() and not f.name.startswith("__"):
            _fsync_file(f)
    meta_path = tmp / META_FILE
    meta_path.write_text(json.dumps(meta, indent=2))
    _fsync_file(meta_path)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old
        old = root / f"{final.name}.replaced-{nonce}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    pointer_tmp = root / f"{LATEST_FILE}.tmp-{nonce}"
    pointer_tmp.write_text(final.name + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    _prune(root, keep_last, protect=final, nonce=nonce)

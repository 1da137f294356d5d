"""Storage failures in words a user can act on: which directory, and what went wrong.

torch and megatron report a full disk as "enforce fail at inline_container.cc ... unexpected pos"
or a bare `OSError` deep in a writer; `storage_error` turns any failure while writing into a
directory into a `StorageError` that names the directory and says whether it ran out of space,
was not writable, or failed otherwise.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

#: Below this much free space, a failed write is reported as a full disk.
FULL_BELOW_BYTES = 64 << 20


class StorageError(OSError):
    """Writing into a directory failed; the message names it and the reason.

    Attributes:
        reason: the directory and what went wrong, without the operation.
    """

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.reason = reason

    def __str__(self) -> str:
        return self.args[0]


def _causes(exc: BaseException):
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        # torch.distributed.checkpoint's CheckpointException carries each rank's failure.
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # {rank: (exception, traceback summary)}
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def storage_error(exc: BaseException, directory: str | Path, what: str) -> StorageError:
    """A `StorageError` for `exc`, raised while `what` wrote into `directory`.

    Args:
        exc: the failure.
        directory: where the writes went.
        what: the operation, e.g. "saving checkpoint step 20".
    """
    d = Path(directory)
    codes = {getattr(e, "errno", None) for e in _causes(exc)}
    text = " ".join(str(e) for e in _causes(exc))
    try:
        usage = shutil.disk_usage(_existing(d))
        free = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
        nearly_full = usage.free < FULL_BELOW_BYTES
    except OSError:
        free, nearly_full = "free space unknown", False
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or (nearly_full and "unexpected pos" in text):
        reason = f"no space left on the filesystem of {d} ({free}); free some space or point it elsewhere"
    elif codes & {errno.EACCES, errno.EPERM, errno.EROFS}:
        reason = f"cannot write {d}: permission denied or read-only filesystem"
    else:
        # The most specific cause: one with an errno, else the innermost (not a rank wrapper).
        causes = list(_causes(exc))
        cause = next((e for e in causes if getattr(e, "errno", None)), causes[-1])
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        reason = f"cannot write {d} ({type(cause).__name__}: {first:.200}; {free})"
    return StorageError(what, reason)

"""One DP share of a step in columnar wire form, cut into bounded chunks (rank 0 -> a DP replica).

    meta = build_header(share, payload, chunk_bytes)         # rank 0; meta.to_bytes() travels first
    for name, chunk in send_chunks(share, meta):              # rank 0: one chunk buffer alive at a time
        ...send chunk...
    meta = header_of(received_bytes)                          # a receiver
    cols = empty_columns(meta)                                # then receive each chunk into
    for name, _, _, lo, hi in chunk_plan(meta): ...           # cols[name][lo:hi]
    payload, share = decode(meta, cols)                       # the same trajectories, bit for bit

A share is a list of mini-batches of `Trajectory`. Its token data travels as three flat columns
(the unique prompts, the response ids, the rollout log-probs) in the trajectories' own dtypes;
every per-sample scalar (reward, accuracy, advantage, group, finish reason, weight version) is one
numpy array in the header, so nothing per sample is pickled as a Python object. Trajectories of
one group share one prompt tensor; it travels once.

Memory on the sending rank: a column travels in chunks of whole items (prompts or responses) of at
most `chunk_bytes` each; a chunk of several items is one fresh numpy concatenation, a single item
is sent straight from the trajectory's own tensor. So beyond the trajectories themselves (8 B per
generated token for int32 ids + float32 log-probs) the sender holds one chunk, never a copy of the
share. Receivers allocate each column once and receive the chunks into slices of it; their
trajectories are views of those columns.
"""
from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator

import numpy as np
import torch

from megafork.rollout.types import FINISH_REASONS
from megafork.train.batch import Trajectory

#: Default chunk size: large enough that per-message overhead is noise, small next to a step.
CHUNK_BYTES = 16 << 20
TOKEN_COLUMNS = ("prompt_ids", "response_ids", "rollout_logprobs")
_SCALARS = ("reward", "accuracy", "advantage")
_HANDLED = {*TOKEN_COLUMNS, *_SCALARS, "group", "finish_reason", "weight_version"}
# A field added to Trajectory must be given a column here, or it would silently not travel.
assert {f.name for f in dataclasses.fields(Trajectory)} == _HANDLED, "train/wire.py: encode every Trajectory field"


@dataclasses.dataclass
class Header:
    """Everything but the token columns: sizes, per-sample scalars, the chunk plan's inputs."""

    payload: object
    sizes: np.ndarray          # trajectories per mini-batch
    prompt_len: np.ndarray     # per unique prompt
    prompt_of: np.ndarray      # per trajectory: its unique prompt
    response_len: np.ndarray   # per trajectory
    scalars: dict              # reward / accuracy / advantage -> float64 per trajectory
    group: np.ndarray
    finish: np.ndarray         # index into FINISH_REASONS
    version: np.ndarray        # int64 weight version (where has_version)
    has_version: np.ndarray
    dtypes: dict               # column -> torch dtype name
    chunk_bytes: int

    @property
    def count(self) -> int:
        return len(self.response_len)

    def lengths(self, column: str) -> np.ndarray:
        return self.prompt_len if column == "prompt_ids" else self.response_len

    def to_bytes(self) -> bytes:
        """The header as bytes (numpy arrays pickle as one buffer each); `header_of` reads it."""
        return pickle.dumps(self, protocol=5)


def build_header(share: list[list[Trajectory]], payload, chunk_bytes: int = CHUNK_BYTES) -> Header:
    """The header of `share`, carrying a small `payload` every receiver gets.

    Raises:
        ValueError: a trajectory whose token fields are not 1-D tensors of its column's dtype, or
            whose weight version is not an int (or None); the message names the trajectory.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes: expected >= 1, found {chunk_bytes}")
    flat = [t for mini in share for t in mini]
    dtypes = {}
    for name in TOKEN_COLUMNS:
        for i, t in enumerate(flat):
            v = getattr(t, name)
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.device.type != "cpu":
                raise ValueError(f"trajectory {i}: {name}: expected a 1-D CPU tensor, found "
                                 f"{type(v).__name__}{'' if not isinstance(v, torch.Tensor) else f' {tuple(v.shape)} on {v.device}'}")
            want = dtypes.setdefault(name, v.dtype)
            if v.dtype != want:
                raise ValueError(f"trajectory {i}: {name}: expected {want} like trajectory 0, found {v.dtype}")
    unique: dict[int, int] = {}
    prompt_of = np.empty(len(flat), dtype=np.int64)
    prompt_len = []
    for i, t in enumerate(flat):
        k = unique.setdefault(id(t.prompt_ids), len(unique))
        if k == len(prompt_len):
            prompt_len.append(t.prompt_ids.numel())
        prompt_of[i] = k
    version, has_version = np.zeros(len(flat), dtype=np.int64), np.zeros(len(flat), dtype=bool)
    for i, t in enumerate(flat):
        v = t.weight_version
        if v is None:
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"trajectory {i}: weight_version: expected an int step count or None, found {v!r}")
        version[i], has_version[i] = v, True
    finish = np.empty(len(flat), dtype=np.uint8)
    for i, t in enumerate(flat):
        if t.finish_reason not in FINISH_REASONS:
            raise ValueError(f"trajectory {i}: finish_reason: expected one of {FINISH_REASONS}, found {t.finish_reason!r}")
        finish[i] = FINISH_REASONS.index(t.finish_reason)
    header = Header(
        payload=payload, sizes=np.array([len(m) for m in share], dtype=np.int64),
        prompt_len=np.array(prompt_len, dtype=np.int64), prompt_of=prompt_of,
        response_len=np.array([t.response_ids.numel() for t in flat], dtype=np.int64),
        scalars={k: np.array([float(getattr(t, k)) for t in flat], dtype=np.float64) for k in _SCALARS},
        group=np.array([int(t.group) for t in flat], dtype=np.int64), finish=finish, version=version,
        has_version=has_version, dtypes={k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
        chunk_bytes=chunk_bytes)
    return header


def header_of(data: bytes | bytearray | memoryview) -> Header:
    """Inverse of `Header.to_bytes`."""
    return pickle.loads(data)


def chunk_plan(meta: Header) -> list[tuple[str, int, int, int, int]]:
    """Every chunk of every column, the same on every rank: (column, first item, end item, first
    element, end element). A chunk holds whole items, at most `chunk_bytes` unless one item alone
    is larger; no chunk is empty (items of no tokens travel in none)."""
    plan = []
    for name in TOKEN_COLUMNS:
        lengths = meta.lengths(name)
        itemsize = _dtype(meta, name).itemsize
        start, elem, size = 0, 0, 0
        for i, n in enumerate([*lengths.tolist(), None]):
            if n is None or (i > start and (size + n) * itemsize > meta.chunk_bytes):
                if size:
                    plan.append((name, start, i, elem, elem + size))
                start, elem, size = i, elem + size, 0
            size += n or 0
    return plan


def send_chunks(share: list[list[Trajectory]], meta: Header) -> Iterator[tuple[str, torch.Tensor]]:
    """The sender's chunks, in `chunk_plan` order, built one at a time.

    A chunk of one item is that trajectory's own tensor (no copy); a chunk of several is one
    numpy concatenation (visible to `tracemalloc`), dropped by the caller before the next.
    """
    flat = [t for mini in share for t in mini]
    prompts = [None] * len(meta.prompt_len)
    for t, k in zip(flat, meta.prompt_of.tolist(), strict=True):
        prompts[k] = t.prompt_ids
    items = {"prompt_ids": prompts, "response_ids": [t.response_ids for t in flat],
             "rollout_logprobs": [t.rollout_logprobs for t in flat]}
    for name, i0, i1, _, _ in chunk_plan(meta):
        parts = items[name][i0:i1]
        if len(parts) == 1:
            yield name, parts[0].contiguous()
        else:
            yield name, torch.from_numpy(np.concatenate([p.numpy() for p in parts]))


def empty_columns(meta: Header) -> dict[str, torch.Tensor]:
    """A receiver's columns, allocated once; the chunks are received into slices of them."""
    return {name: torch.empty(int(meta.lengths(name).sum()), dtype=_dtype(meta, name)) for name in TOKEN_COLUMNS}


def decode(meta: Header, columns: dict[str, torch.Tensor]) -> tuple[object, list[list[Trajectory]]]:
    """The payload and the share; token fields are views of `columns` (read-only use, as the trainer's)."""
    prompts = torch.split(columns["prompt_ids"], meta.prompt_len.tolist()) if len(meta.prompt_len) else []
    responses = torch.split(columns["response_ids"], meta.response_len.tolist()) if meta.count else []
    logprobs = torch.split(columns["rollout_logprobs"], meta.response_len.tolist()) if meta.count else []
    reward, accuracy, advantage = (meta.scalars[k].tolist() for k in _SCALARS)
    group, finish, version, has = (a.tolist() for a in (meta.group, meta.finish, meta.version, meta.has_version))
    flat = [Trajectory(prompt_ids=prompts[k], response_ids=responses[i], rollout_logprobs=logprobs[i],
                       reward=reward[i], accuracy=accuracy[i], advantage=advantage[i], group=group[i],
                       finish_reason=FINISH_REASONS[finish[i]], weight_version=version[i] if has[i] else None)
            for i, k in enumerate(meta.prompt_of.tolist())]
    share, start = [], 0
    for size in meta.sizes.tolist():
        share.append(flat[start:start + size])
        start += size
    return meta.payload, share


def _dtype(meta: Header, column: str) -> torch.dtype:
    default = "float32" if column == "rollout_logprobs" else "int32"
    return getattr(torch, meta.dtypes.get(column, default))

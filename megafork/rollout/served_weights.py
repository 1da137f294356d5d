"""What weights a rollout server is serving: its weight version and, where offered, checksums.

    before = served_weights("http://10.0.0.5:30000")          # ServedWeights(version="4", checksums={...})
    diff = before.differs_from(trainer_sums)                  # names whose bytes differ

SGLang reports `weight_version` in `/model_info` ("default" until an update sets it; the
pre-0.5.23 name `/get_model_info` is used on a 404).
`megafork serve` also answers `/get_weights_checksum` (sha256 per weight in the server's dtype);
a server without it (real SGLang) is compared by version alone.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from megafork.rollout.buckets import dtype_from_name, tensor_checksum
from megafork.rollout.httpjson import get_info, request_json

#: The version SGLang (and `megafork serve`) report before any weight update.
INITIAL_VERSION = "default"


@dataclass
class ServedWeights:
    """One server's answer.

    Attributes:
        url: the server.
        version: its `weight_version` (None if it reports none).
        checksums: sha256 per tensor name, or None when the server has no checksum endpoint.
        dtype: the dtype those checksums are taken in.
    """

    url: str
    version: str | None
    checksums: dict[str, str] | None = None
    dtype: torch.dtype | None = None

    def differs_from(self, sums: dict[str, str]) -> list[str]:
        """Names (among `sums`) whose served bytes differ from `sums`; a name the server lacks counts."""
        if self.checksums is None:
            return []
        return sorted(n for n, s in sums.items() if self.checksums.get(n) != s)


def served_weights(url: str, timeout_s: float = 600.0) -> ServedWeights:
    """Ask one server which weights it serves (`/get_weights_checksum`, else `/model_info`)."""
    status, body = request_json(url, "/get_weights_checksum", timeout_s=timeout_s)
    if status == 200 and isinstance(body, dict) and isinstance(body.get("checksums"), dict):
        return ServedWeights(url, _version(body), dict(body["checksums"]),
                             dtype_from_name(body.get("dtype"), f"{url}/get_weights_checksum dtype"))
    return ServedWeights(url, _version(get_info(url, "model_info", timeout_s)))


def _version(body: dict) -> str | None:
    v = body.get("weight_version")
    return None if v is None else str(v)


class ChecksumTap:
    """Pass (name, tensor) pairs through while recording each tensor's sha256 in `dtype`.

    Args:
        dtype: the dtype the server holds its weights in (checksums are of those bytes).
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.sums: dict[str, str] = {}

    def wrap(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in named_tensors:
            self.sums[name] = tensor_checksum(t.detach().to(self.dtype))
            yield name, t


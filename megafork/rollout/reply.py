"""SGLang `/generate` replies, from the socket into compact arrays.

    buffers = ReplyBuffers()
    with buffers.body(resp) as raw:                      # the reply bytes, in a reused buffer
        group = decode_reply(raw, n=16, prompt_index=3, url="http://10.0.0.5:30000")

A reply for one prompt group (n samples) is read into a receive buffer that is reused by the
next request (`ReplyBuffers`: at most one buffer per core, whatever the number of requests in
flight, and no per-reply allocation). Almost
all of its bytes are the `output_ids` lists and the `meta_info.output_token_logprobs` triples;
the C++ extension (`megafork._C.parse_generate_reply`) parses those straight from the buffer
into the group's final int32 / float32 arrays, allocated at their exact size, with the GIL
released. Only the small remainder (finish reasons, weight version, text) goes through `json`.

A group therefore costs 8 bytes per generated token (plus a few hundred bytes per group), and the
transient memory is one receive buffer per reply being received (at most one per core).

`parse_group` is the pure-Python twin: `json.loads` of the whole reply, then the same arrays.
`decode_reply` falls back to it whenever the fast path meets anything it does not parse (token
texts in the triples, pretty-printed lists, a missing key); the fallback also produces the error
message for a malformed reply.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from megafork import _C
from megafork.rollout.types import RolloutError, Sample

# The json fallback expands a reply into Python objects (tens of bytes per token): one at a time.
_JSON_LOCK = threading.Lock()


@dataclass
class GroupResult:
    """The n responses of one prompt, stored compactly.

    Attributes:
        prompt_index: index of the prompt in the `run` call.
        ids: int32 token ids of all responses, concatenated.
        logprobs: float32 rollout log-probs, aligned with `ids`.
        offsets: int64 [n + 1]; response j is `ids[offsets[j]:offsets[j + 1]]`.
        finish_reasons: "stop" | "length" | "abort" per response.
        weight_version: the server's weight version when the group finished.
        url: the server that generated it.
    """

    prompt_index: int
    ids: np.ndarray
    logprobs: np.ndarray
    offsets: np.ndarray
    finish_reasons: list[str]
    weight_version: str | None = None
    url: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def samples(self) -> list[Sample]:
        """The responses as `Sample`s whose ids/log-probs are views into the group's arrays."""
        o = self.offsets
        return [Sample(prompt_index=self.prompt_index, response_ids=self.ids[o[j]:o[j + 1]],
                       logprobs=self.logprobs[o[j]:o[j + 1]], finish_reason=r, weight_version=self.weight_version)
                for j, r in enumerate(self.finish_reasons)]


class ReplyBuffers:
    """Receive buffers reused across requests.

    At most `max_receiving` replies are read and parsed at once (more would not parse faster than
    the cores allow); the other finished requests wait with their reply still in the socket. So
    the transient memory is `max_receiving` buffers whatever `rollout.max_inflight_per_server`
    is. A buffer grows (by replacement) to the largest reply it has held; `clear()` lets them go.

    Args:
        max_receiving: replies received at once (default: the CPU count, at least 2).
    """

    def __init__(self, max_receiving: int | None = None):
        self.max_receiving = max_receiving or max(2, os.cpu_count() or 2)
        self._slots = threading.BoundedSemaphore(self.max_receiving)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextmanager
    def body(self, resp: http.client.HTTPResponse):
        """Yield the whole body of `resp` as a memoryview into a reused buffer (valid inside the block).

        A reply without Content-Length (chunked) is read with `resp.read()` instead.

        Raises:
            http.client.IncompleteRead: the connection closed before the announced length.
        """
        length = resp.length
        if length is None:
            yield memoryview(resp.read())
            return
        self._slots.acquire()
        with self._lock:
            buf = self._free.pop() if self._free else np.empty(0, dtype=np.uint8)
        try:
            if buf.shape[0] < length:
                # Uninitialised (unlike bytearray(n)): the headroom for a longer next reply costs
                # no resident memory until it is written.
                buf = np.empty(length + length // 8, dtype=np.uint8)
            with memoryview(buf) as view:
                got = 0
                while got < length:
                    k = resp.readinto(view[got:length])
                    if not k:
                        raise http.client.IncompleteRead(b"", length - got)
                    got += k
                with view[:length] as raw:
                    yield raw
        finally:
            with self._lock:
                self._free.append(buf)
            self._slots.release()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def decode_reply(raw, n: int, prompt_index: int, url: str) -> GroupResult:
    """Decode the raw `/generate` reply for one prompt (n samples) into a `GroupResult`.

    Args:
        raw: the reply bytes (bytes, bytearray or memoryview; not kept).
        n: samples expected.
        prompt_index, url: for the result and messages.

    Raises:
        RolloutError: the reply is not SGLang's shape (naming the URL and what is wrong).
    """
    try:
        ids, logprobs, offsets, spans = _C.parse_generate_reply(raw, n)
    except ValueError:
        return _decode_json(raw, n, prompt_index, url)
    # The remainder, each parsed list replaced by [], is small: json reads the rest of the fields.
    view, pieces, pos = memoryview(raw), [], 0
    for begin, end in spans.tolist():
        pieces += [view[pos:begin], b"[]"]
        pos = end
    pieces.append(view[pos:])
    try:
        payload = json.loads(b"".join(pieces))
    except json.JSONDecodeError:
        return _decode_json(raw, n, prompt_index, url)
    items = payload if isinstance(payload, list) else [payload]
    # Every item must have held exactly one of each parsed list, so the k-th lists were item k's.
    if len(items) != n or not all(isinstance(it, dict) and it.get("output_ids") == [] and isinstance(
            it.get("meta_info"), dict) and it["meta_info"].get("output_token_logprobs") == [] for it in items):
        return _decode_json(raw, n, prompt_index, url)
    reasons, version = _finish(items, _where(url, prompt_index))
    return GroupResult(prompt_index, ids, logprobs, offsets, reasons, version, url)


def parse_group(payload: object, n: int, prompt_index: int, url: str) -> GroupResult:
    """Turn a decoded `/generate` reply for one prompt (n samples) into a `GroupResult`.

    The pure-Python twin of `decode_reply`'s fast path.

    Args:
        payload: the decoded JSON (one item, or a list of n).
        n: samples expected.
        prompt_index, url: for the result and messages.

    Raises:
        RolloutError: the reply does not have SGLang's shape (naming the URL and what is missing).
    """
    items = payload if isinstance(payload, list) else [payload]
    where = _where(url, prompt_index)
    if len(items) != n:
        raise RolloutError(f"{where}: expected {n} outputs, got {len(items)}")
    reasons, version = _finish(items, where)
    ids_parts, lp_parts = [], []
    offsets = np.zeros(n + 1, dtype=np.int64)
    for j, item in enumerate(items):
        try:
            ids = np.asarray(item["output_ids"], dtype=np.int64)
            lps = item["meta_info"]["output_token_logprobs"]
            if len(lps) != len(ids):
                raise RolloutError(f"{where}: output {j}: {len(lps)} output_token_logprobs for {len(ids)} output_ids")
            lp = np.fromiter((t[0] for t in lps), dtype=np.float64, count=len(lps)).astype(np.float32)
            check = np.fromiter((t[1] for t in lps), dtype=np.int64, count=len(lps))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RolloutError(f"{where}: output {j}: {type(exc).__name__} {exc} (expected output_ids and "
                               "meta_info.output_token_logprobs as [logprob, token_id, text] triples)") from exc
        if not np.array_equal(check, ids):
            raise RolloutError(f"{where}: output {j}: output_token_logprobs do not match output_ids")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise RolloutError(f"{where}: output {j}: token ids outside [0, 2**31)")
        ids_parts.append(ids.astype(np.int32))
        lp_parts.append(lp)
        offsets[j + 1] = offsets[j] + len(ids)
    return GroupResult(prompt_index, np.concatenate(ids_parts), np.concatenate(lp_parts), offsets, reasons,
                       version, url)


def _decode_json(raw, n: int, prompt_index: int, url: str) -> GroupResult:
    with _JSON_LOCK:
        try:
            payload = json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)
        except json.JSONDecodeError as exc:
            raise RolloutError(f"{_where(url, prompt_index)}: reply is not JSON ({exc})") from exc
        return parse_group(payload, n, prompt_index, url)


def _finish(items: list, where: str) -> tuple[list[str], str | None]:
    """Finish reasons and the last weight version of the reply's items."""
    reasons, version = [], None
    for j, item in enumerate(items):
        try:
            meta = item["meta_info"]
            fr = meta.get("finish_reason")
            reasons.append(fr["type"] if fr else "abort")
            version = meta.get("weight_version", version)
        except (KeyError, TypeError, AttributeError) as exc:
            raise RolloutError(f"{where}: output {j} lacks {exc} (expected meta_info.finish_reason)") from exc
        if reasons[-1] not in ("stop", "length", "abort"):
            raise RolloutError(f"{where}: finish_reason {reasons[-1]!r}: expected stop, length or abort")
    return reasons, version


def _where(url: str, prompt_index: int) -> str:
    return f"{url}/generate (prompt {prompt_index})"

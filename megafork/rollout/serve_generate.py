"""`megafork serve`'s `/generate` and `/abort_request`, with SGLang 0.5.23's semantics.

- **Seeds** work as SGLang's do under `--enable-deterministic-inference`: a request's
  `sampling_seed` seeds that request, and with `n > 1` all n copies of the prompt get the same
  seed (SGLang copies `sampling_params` to every copy), so they come out identical. Send one entry
  per sample with its own seed for distinct samples (`SGLangEngine` does). Without a seed each
  row draws fresh randomness.
- **Bounds.** A prompt at or over the model's context (`max_position_embeddings`), or prompt +
  `max_new_tokens` over it, is a 400 with both numbers (SGLang's wording); `max_new_tokens` above
  the server's `--max-new-tokens-cap` is a 400 too.
- **Aborts.** `/abort_request` with `rid` ends every in-flight request whose id starts with it
  (SGLang's scheduler matches by prefix), `abort_all` ends all of them; their answers carry
  `finish_reason` `{"type": "abort"}` and the tokens made so far. A client that disconnects
  aborts its own request at the next decoding step. Every `/abort_request` is logged with the
  number of requests it ended.
- **Waiting queue.** With `max_running_requests` (`--max-running-requests`), at most that many
  `/generate` calls generate at once (SGLang counts each prompt copy; here a call is the unit);
  the others wait in arrival order, and an abort ends a waiting call at once with no tokens, as
  SGLang ends a request still in its waiting queue.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from http import HTTPStatus

from megafork.rollout import protocol
from megafork.rollout.embedded import EmbeddedEngine
from megafork.rollout.serve_weights import HttpError
from megafork.rollout.types import validate_prompts

log = logging.getLogger("megafork.serve")


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, {"error": {"message": message}})


class GenerateService:
    """`/generate` on an `EmbeddedEngine`, with an abort registry of the requests in flight.

    Args:
        engine: the engine.
        max_new_tokens_cap: refuse requests asking for more new tokens than this (None: no cap).
        max_running_requests: `/generate` calls generating at once (None: no limit).
    """

    def __init__(self, engine: EmbeddedEngine, max_new_tokens_cap: int | None = None,
                 max_running_requests: int | None = None):
        if max_running_requests is not None and max_running_requests < 1:
            raise ValueError(f"max_running_requests: expected >= 1 or None, found {max_running_requests}")
        self.engine = engine
        self.max_new_tokens_cap = max_new_tokens_cap
        self._slots = _WaitingQueue(max_running_requests) if max_running_requests else None
        cfg = engine.config
        self.context_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def num_running(self) -> int:
        """Requests (prompt entries) being generated now."""
        with self._lock:
            return len(self._inflight)

    def abort(self, body) -> None:
        try:
            req = protocol.parse_abort(body)
        except protocol.BadRequest as exc:
            raise _bad(str(exc)) from exc
        if req.abort_all:
            self.engine.abort_all()
        with self._lock:
            events = [e for rid, e in self._inflight.items() if req.abort_all or (req.rid and rid.startswith(req.rid))]
        for e in events:
            e.set()
        log.info("/abort_request (%s): %d request(s) in flight ended", "abort_all" if req.abort_all else
                 f"rid {req.rid!r}", len(events))

    def _check_lengths(self, prompts: list[list[int]], sampling) -> None:
        for i, (p, sp) in enumerate(zip(prompts, sampling)):
            if self.max_new_tokens_cap is not None and sp.max_new_tokens > self.max_new_tokens_cap:
                raise _bad(f"sampling_params.max_new_tokens: {sp.max_new_tokens} is over this server's cap of "
                           f"{self.max_new_tokens_cap} tokens per request (--max-new-tokens-cap)")
            if self.context_len is None:
                continue
            if len(p) >= self.context_len:
                raise _bad(f"The input ({len(p)} tokens) is longer than the model's context length "
                           f"({self.context_len} tokens). (prompt {i})")
            if len(p) + sp.max_new_tokens > self.context_len:
                raise _bad(f"Requested token count exceeds the model's maximum context length of {self.context_len} "
                           f"tokens. You requested a total of {len(p) + sp.max_new_tokens} tokens: {len(p)} tokens "
                           f"from the input messages and {sp.max_new_tokens} tokens for the completion. (prompt {i})")

    def generate(self, body, disconnected: threading.Event | None = None) -> object:
        """Serve one `/generate` body; `disconnected` is set when the client goes away."""
        try:
            req = protocol.parse_generate(body)
        except (protocol.BadRequest, ValueError) as exc:
            raise _bad(str(exc)) from exc
        engine, tok = self.engine, self.engine.tokenizer
        try:
            if req.prompts is None:
                if tok is None:
                    raise ValueError(f"text: {engine.model_path} has no tokenizer; send input_ids instead")
                prompts = validate_prompts([tok.encode(t) for t in req.texts], engine.config.vocab_size, "text")
            else:
                prompts = validate_prompts(req.prompts, engine.config.vocab_size)
        except ValueError as exc:
            raise _bad(str(exc)) from exc
        self._check_lengths(prompts, req.sampling)
        rids = req.rids or [uuid.uuid4().hex for _ in prompts]
        cancels = [threading.Event() for _ in prompts]
        with self._lock:
            for rid, e in zip(rids, cancels):
                self._inflight[rid] = e
        watcher = None
        if disconnected is not None:
            watcher = threading.Thread(target=_relay, args=(disconnected, cancels), daemon=True)
            watcher.start()
        running = False
        try:
            # Aborted while waiting: no slot needed, the engine ends cancelled rows before any step.
            running = self._slots is None or self._slots.acquire(lambda: all(e.is_set() for e in cancels))
            samples = self._run(prompts, req, cancels)
        finally:
            if running and self._slots is not None:
                self._slots.release()
            with self._lock:
                for rid in rids:
                    self._inflight.pop(rid, None)
            for e in cancels:  # also ends the watcher
                e.set()
        items = [self._item(s, k, req, prompts, rids, tok) for k, s in enumerate(samples)]
        return items[0] if req.is_single else items

    def _run(self, prompts, req, cancels):
        """Generate every entry; entries sharing one parameter object run as one batch."""
        groups: list[tuple[object, list[int]]] = []
        for i, sp in enumerate(req.sampling):
            if groups and groups[-1][0] is sp:
                groups[-1][1].append(i)
            else:
                groups.append((sp, [i]))
        samples = []
        for sp, idx in groups:
            # A request's seed seeds each of its rows, n copies included (SGLang's behaviour).
            seeds = [sp.seed for _ in idx for _ in range(sp.n)]
            out = self.engine.generate([prompts[i] for i in idx], sp, row_seeds=seeds,
                                       cancel=[cancels[i] for i in idx])
            for s in out:
                s.prompt_index = idx[s.prompt_index]
            samples.extend(out)
        return samples

    def _item(self, s, k, req, prompts, rids, tok) -> dict:
        i = s.prompt_index
        sp = req.sampling[i]
        meta = {
            "id": rids[i] + (f"-{k % sp.n}" if sp.n > 1 else ""),
            "finish_reason": _finish_reason(s, sp),
            "prompt_tokens": len(prompts[i]),
            "completion_tokens": len(s.response_ids),
            "cached_tokens": 0,
            "weight_version": s.weight_version,
        }
        if req.return_logprob[i]:
            texts = ([tok.decode([t]) for t in s.response_ids] if req.return_text_in_logprobs and tok is not None
                     else [None] * len(s.response_ids))
            meta["output_token_logprobs"] = [[lp, t, x] for lp, t, x in zip(s.logprobs, s.response_ids, texts)]
            meta["output_token_logprobs_length"] = len(s.logprobs)
            meta["input_token_logprobs"] = []
        text = tok.decode(s.response_ids, skip_special_tokens=True) if tok is not None else ""
        return {"text": text, "output_ids": s.response_ids, "meta_info": meta}


def _relay(disconnected: threading.Event, cancels: list[threading.Event]) -> None:
    """Abort every entry of a request once its client has gone away."""
    while not all(e.is_set() for e in cancels):
        if disconnected.wait(0.05):
            for e in cancels:
                e.set()
            return


def _finish_reason(sample, sp) -> dict:
    if sample.finish_reason == "stop":
        return {"type": "stop", "matched": sample.response_ids[-1]}
    if sample.finish_reason == "length":
        return {"type": "length", "length": sp.max_new_tokens}
    return {"type": "abort", "message": "The request was aborted (/abort_request, /pause_generation, a weight "
                                        "update, or its client disconnected)."}


class _WaitingQueue:
    """At most `slots` holders at once; waiters take a slot in arrival order."""

    def __init__(self, slots: int):
        self._free = slots
        self._queue: deque[object] = deque()
        self._cv = threading.Condition()

    def acquire(self, ended) -> bool:
        """Wait for a slot; returns False (holding none) as soon as `ended()` is true."""
        ticket = object()
        with self._cv:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self._free > 0):
                    if ended():
                        return False
                    self._cv.wait(0.05)  # an abort sets events, not this condition: poll it
                self._free -= 1
                return True
            finally:
                self._queue.remove(ticket)
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self._free += 1
            self._cv.notify_all()

"""Streaming rollout over SGLang servers: one request per prompt group, parsed as it arrives.

    client = StreamingClient(["http://10.0.0.5:30000", "http://10.0.0.6:30000"], StreamConfig(max_inflight_per_server=64))
    result = client.run(prompt_ids, SamplingParams(n=16, max_new_tokens=20480, seed=7), on_group=score_and_decide)

Each prompt's n samples are one `/generate` request (SGLang's parallel sampling, `rid` set so the
request can be aborted). At most `max_inflight_per_server` requests are open per server. A reply
is read into a receive buffer reused across requests and parsed from it, in the worker thread that
received it and without the GIL, into one `GroupResult` (`megafork.rollout.reply`): the n responses
as one int32 id array and one float32 log-prob array with offsets, so a step's responses cost 8
bytes per generated token plus a small per-group overhead, never Python lists of floats.

Failures:
- a timeout or a 5xx is retried on another server (when there is one), at most `retries` times
  per request;
- a server that refuses or drops connections, or times out `retries + 1` times in a row, is
  dropped for the rest of the call with a warning, and its open requests are reassigned;
- a 4xx or a malformed reply is an error naming the URL (it would fail again anywhere);
- when no server is left, `RolloutError` names every URL and why it was dropped.

Early stop: `on_group(result)` is called in the caller's thread as each group completes; when it
returns True, the open requests are aborted with SGLang's `/abort_request {"rid": ...}`, nothing
new is sent, and the call returns what it has (aborted partial responses count as wasted).
"""
from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace

from megafork.rollout.httpjson import request_json
from megafork.rollout.reply import GroupResult, ReplyBuffers, decode_reply, parse_group  # noqa: F401 (re-exported)
from megafork.rollout.sampling import sample_seed
from megafork.rollout.types import RolloutError, SamplingParams

log = logging.getLogger(__name__)

@dataclass
class StreamConfig:
    """How the streaming client talks to the servers.

    Attributes:
        max_inflight_per_server: open requests per server (>= 1).
        request_timeout_s: socket timeout of one request (connect and each read); a request
            that produces nothing for this long is retried elsewhere.
        retries: extra attempts per request after a timeout or 5xx.
        abort_grace_s: after an early stop, how long to wait for aborted requests to return.
        progress: show a progress bar (samples done / total, tokens/s).
    """

    max_inflight_per_server: int = 64
    request_timeout_s: float = 3600.0
    retries: int = 2
    abort_grace_s: float = 30.0
    progress: bool = False

    def __post_init__(self):
        if not isinstance(self.max_inflight_per_server, int) or self.max_inflight_per_server < 1:
            raise ValueError(f"rollout.max_inflight_per_server: expected an integer >= 1, "
                             f"found {self.max_inflight_per_server!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"rollout.request_timeout_s: expected > 0, found {self.request_timeout_s!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"rollout.request_retries: expected an integer >= 0, found {self.retries!r}")


@dataclass
class StreamResult:
    """What one `run` produced. `groups[i]` is prompt i's group, or None if it was never finished."""

    groups: list[GroupResult | None]
    tokens: int = 0
    wasted_tokens: int = 0
    requests: int = 0
    retries: int = 0
    aborted_requests: int = 0
    dropped_servers: list[str] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"rollout_tokens": self.tokens, "rollout_wasted_tokens": self.wasted_tokens,
                "rollout_requests": self.requests, "rollout_retries": self.retries,
                "rollout_aborted_requests": self.aborted_requests, "rollout_dropped_servers": len(self.dropped_servers),
                "rollout_tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0}


class _Failure(Exception):
    """A request failed; `kind` is "down" (server unreachable), "timeout", "retryable" or "fatal"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Server:
    url: str
    host: str
    port: int
    alive: bool = True
    inflight: int = 0
    timeouts_in_a_row: int = 0
    reason: str = ""


def generate_body(prompts: list[list[int]], sampling: SamplingParams, start: int, end: int) -> dict:
    """The `/generate` body for prompts[start:end] (their indices in the step are kept for seeds).

    Unseeded: one entry per prompt with SGLang's parallel sampling (`n`). Seeded: one entry per
    sample, each with `n=1` and its own `sampling_seed` from `sample_seed(seed, prompt, sample, n)`:
    SGLang copies a request's seed to all n copies of a prompt, so one seed per prompt would make
    the n responses identical under `--enable-deterministic-inference`. SGLang answers a batch in
    entry order, so the samples still come back prompt-major.
    """
    chunk = prompts[start:end]
    if sampling.seed is None:
        return {"input_ids": chunk, "sampling_params": sampling.to_sglang(), "return_logprob": True}
    one = replace(sampling, n=1, seed=None).to_sglang()
    n = sampling.n
    return {"input_ids": [p for p in chunk for _ in range(n)],
            "sampling_params": [{**one, "sampling_seed": sample_seed(sampling.seed, start + i, j, n)}
                                for i in range(len(chunk)) for j in range(n)],
            "return_logprob": True}


class StreamingClient:
    """Streams one step's generation over several SGLang servers (see the module docstring).

    Args:
        urls: server base URLs.
        config: in-flight limit, timeouts, retries, progress bar.
    """

    def __init__(self, urls: list[str], config: StreamConfig | None = None):
        if not urls:
            raise ValueError("rollout.sglang_urls: at least one server URL is needed")
        self.config = config or StreamConfig()
        self.urls = [u.rstrip("/") for u in urls]
        for u in self.urls:
            parsed = urllib.parse.urlsplit(u)
            if parsed.scheme != "http" or not parsed.hostname:
                raise ValueError(f"rollout.sglang_urls: expected http://host:port, found {u!r}")

    def run(self, prompts: list[list[int]], sampling: SamplingParams,
            on_group: Callable[[GroupResult], bool] | None = None) -> StreamResult:
        """Generate `sampling.n` responses for every prompt; one request per prompt.

        Args:
            prompts: token-id prompts.
            sampling: sampling parameters; with a seed, sample j of prompt i gets
                `sample_seed(seed, i, j, n)` (`generate_body`), whatever the server count or timing.
            on_group: called in this thread with each finished group; returning True stops the
                call early (the open requests are aborted).

        Returns:
            A `StreamResult`; without an early stop every group is present.
        """
        cfg = self.config
        t0 = time.perf_counter()
        servers = [_Server(u, urllib.parse.urlsplit(u).hostname, urllib.parse.urlsplit(u).port or 80) for u in self.urls]
        result = StreamResult(groups=[None] * len(prompts))
        pending: deque[int] = deque(range(len(prompts)))
        attempts = [0] * len(prompts)
        last_failed: dict[int, str] = {}
        inflight: dict[Future, tuple[int, _Server, str]] = {}
        bar = _progress(cfg.progress, len(prompts) * sampling.n)
        pool = ThreadPoolExecutor(max_workers=len(servers) * cfg.max_inflight_per_server,
                                  thread_name_prefix="rollout-stream")
        buffers = ReplyBuffers()  # receive buffers reused for the whole call, one per reply being read (<= cores)
        try:
            while pending or inflight:
                alive = [s for s in servers if s.alive]
                if not alive:
                    raise RolloutError("rollout: no SGLang server left; "
                                       + "; ".join(f"{s.url} dropped: {s.reason}" for s in servers))
                self._fill(pending, alive, inflight, last_failed, prompts, sampling, pool, result, buffers)
                done, _ = wait_futures(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
                stop = False
                for fut in done:
                    if fut not in inflight:  # its server was dropped; the group went back to pending
                        continue
                    idx, server, rid = inflight.pop(fut)
                    server.inflight -= 1
                    try:
                        group = fut.result()
                    except _Failure as exc:
                        self._failed(exc, idx, server, servers, inflight, pending, attempts, last_failed, result)
                        continue
                    server.timeouts_in_a_row = 0
                    result.groups[idx] = group
                    result.tokens += group.num_tokens
                    if bar is not None:
                        bar.update(sampling.n)
                        bar.set_postfix_str(f"{result.tokens / (time.perf_counter() - t0):,.0f} tok/s", refresh=False)
                    if on_group is not None and not stop and on_group(group):
                        stop = True
                if stop:
                    result.stopped_early = True
                    self._abort(inflight, result)
                    pending.clear()
                    break
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
            buffers.clear()
        result.seconds = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------ internals

    def _fill(self, pending, alive, inflight, last_failed, prompts, sampling, pool, result, buffers) -> None:
        """Hand pending prompts to the least-loaded servers with free slots, avoiding the server a
        prompt last failed on when another one can take it."""
        cap = self.config.max_inflight_per_server
        while pending:
            free = [s for s in alive if s.inflight < cap]
            if not free:
                return
            idx = pending.popleft()
            avoid = last_failed.get(idx)
            server = min(free, key=lambda s: (s.url == avoid and len(alive) > 1, s.inflight))
            # A unique id prefix per request: /abort_request matches request ids by prefix.
            rid = f"megafork-{uuid.uuid4().hex}"
            body = generate_body(prompts, sampling, idx, idx + 1)
            body["rid"] = [f"{rid}.{j}" for j in range(len(body["input_ids"]))]
            server.inflight += 1
            result.requests += 1
            inflight[pool.submit(self._request, server, body, sampling.n, idx, buffers)] = (idx, server, rid)

    def _request(self, server: _Server, body: dict, n: int, idx: int, buffers: ReplyBuffers) -> GroupResult:
        data = json.dumps(body).encode()
        conn = http.client.HTTPConnection(server.host, server.port, timeout=self.config.request_timeout_s)
        try:
            conn.request("POST", "/generate", body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            # The reply is read into a reused buffer and parsed from it before the buffer goes back.
            with buffers.body(resp) as raw:
                if resp.status >= 500:
                    raise _Failure("retryable", f"HTTP {resp.status}: {bytes(raw[:300])!r}")
                if resp.status >= 400:
                    raise _Failure("fatal", f"{server.url}/generate: HTTP {resp.status}: {bytes(raw[:500])!r}")
                try:
                    return decode_reply(raw, n, idx, server.url)
                except RolloutError as exc:
                    raise _Failure("fatal", str(exc)) from exc
        except TimeoutError as exc:
            raise _Failure("timeout", f"no answer within rollout.request_timeout_s={self.config.request_timeout_s:g}s "
                                      f"({exc})") from exc
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Failure("down", f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()

    def _failed(self, exc: _Failure, idx, server, servers, inflight, pending, attempts, last_failed, result) -> None:
        if exc.kind == "fatal":
            raise RolloutError(str(exc))
        last_failed[idx] = server.url
        if exc.kind == "timeout":
            server.timeouts_in_a_row += 1
        if exc.kind == "down" or server.timeouts_in_a_row > self.config.retries:
            self._drop(server, str(exc), inflight, pending, result)
        else:
            attempts[idx] += 1
            result.retries += 1
            if attempts[idx] > self.config.retries:
                raise RolloutError(f"rollout: prompt {idx} failed {attempts[idx]} times "
                                   f"(rollout.request_retries={self.config.retries}); last on {server.url}: {exc}")
            log.warning("rollout: request for prompt %d failed on %s (%s); retrying on another server", idx,
                        server.url, exc)
        pending.appendleft(idx)

    def _drop(self, server: _Server, reason: str, inflight, pending, result) -> None:
        if not server.alive:
            return
        server.alive = False
        server.reason = reason
        result.dropped_servers.append(server.url)
        moved = [f for f, (_, s, _) in inflight.items() if s is server]
        for f in moved:
            idx, _, _ = inflight.pop(f)
            pending.appendleft(idx)
        server.inflight = 0
        log.warning("rollout: server %s dropped for the rest of this step (%s); %d open requests reassigned",
                    server.url, reason, len(moved) + 1)

    def _abort(self, inflight, result) -> None:
        """Abort every open request (SGLang `/abort_request`) and collect what they return."""
        for _, server, rid in inflight.values():
            try:
                request_json(server.url, "/abort_request", {"rid": rid}, timeout_s=10)
            except RolloutError as exc:
                log.warning("rollout: could not abort %s on %s: %s", rid, server.url, exc)
        result.aborted_requests += len(inflight)
        done, _ = wait_futures(list(inflight), timeout=self.config.abort_grace_s)
        for fut in done:
            try:
                result.wasted_tokens += fut.result().num_tokens
            except _Failure:
                pass
        inflight.clear()


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="rollout", unit="sample", dynamic_ncols=True, leave=False)

"""SYNTHETIC `megafork serve` for tests and benchmarks: SGLang's protocol, no real model behind it.

    python -m megafork.testing.synthetic_serve --port 30001 --response-len 2000       # random tokens at once
    python -m megafork.testing.synthetic_serve --port 30002 --delay-s 30              # a server that stalls
    python -m megafork.testing.synthetic_serve --port 30003 --model HF_DIR --delay-s 5   # a real model, slowed
    python -m megafork.testing.synthetic_serve --port 30004 --prebuilt                  # replies from a cache

This is deliberately not a `megafork` CLI command: it serves made-up responses and must never be
mistaken for a model. It runs `megafork serve`'s own HTTP server (`megafork.rollout.server`) over
one of two engines:

- `RandomTokenEngine`: every response is `--response-len` uniformly random token ids with random
  log-probs, returned without any computation (finish reason "length" when that is
  max_new_tokens, else "stop"). It measures what a client can ingest.
- `--model HF_DIR`: the real `EmbeddedEngine`, with `--delay-s` added before each generation
  (a slow server, for timeout tests of the trainer's control plane).
- `--prebuilt`: not `megafork serve`'s server but a minimal one that answers `/generate` with
  prebuilt bytes: a few random samples encoded once in SGLang's reply shape, joined per request
  shape and written with one `sendall`, so a benchmark measures the client's ingestion rather
  than the server's JSON encoder.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import numpy as np
import torch

from megafork.rollout.types import Sample, SamplingParams, validate_prompts

log = logging.getLogger("megafork.synthetic_serve")


class RandomTokenEngine:
    """SYNTHETIC engine: random token ids and log-probs, produced at once (no model).

    Args:
        vocab_size: ids are drawn from [0, vocab_size).
        response_len: tokens per response (capped by max_new_tokens).
        delay_s: seconds to sleep before answering each request (a stalling server).
        seed: base seed of the random stream.
        stall_token, stall_s: prompts whose first token is `stall_token` take `stall_s` seconds,
            unless aborted (`/abort_request`), which ends them at once with finish reason "abort".
    """

    synthetic = True

    def __init__(self, vocab_size: int = 151936, response_len: int = 2000, delay_s: float = 0.0, seed: int = 0,
                 stall_token: int | None = None, stall_s: float = 0.0):
        self.config = SimpleNamespace(vocab_size=vocab_size, model_type="synthetic-random", architectures=["Synthetic"])
        self.model_path = "SYNTHETIC-random-tokens"
        self.tokenizer = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.max_batch_rows = 1 << 30
        self.weight_version = "synthetic"
        self.response_len = response_len
        self.delay_s = delay_s
        self.stall_token, self.stall_s = stall_token, stall_s
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self.generated_tokens = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, row_seeds=None,
                 cancel: threading.Event | list[threading.Event] | None = None) -> list[Sample]:
        """Random responses; a prompt starting with `stall_token` first waits `stall_s` (or until
        its cancel event is set, when it returns the share of tokens "made so far", finish "abort")."""
        prompts = validate_prompts(prompts, self.config.vocab_size)
        if self.delay_s:
            time.sleep(self.delay_s)
        self._running.wait()
        cancels = cancel if isinstance(cancel, list) else [cancel] * len(prompts)
        length = min(self.response_len, sampling.max_new_tokens)
        out = []
        for i, p in enumerate(prompts):
            n_tok, reason = length, "length" if length == sampling.max_new_tokens else "stop"
            if self.stall_token is not None and p[0] == self.stall_token:
                t0 = time.monotonic()
                if cancels[i] is not None and cancels[i].wait(self.stall_s):
                    n_tok, reason = int(length * min(1.0, (time.monotonic() - t0) / self.stall_s)), "abort"
                elif cancels[i] is None:
                    time.sleep(self.stall_s)
            with self._lock:
                ids = self._rng.integers(0, self.config.vocab_size, size=(sampling.n, n_tok), dtype=np.int64)
                lps = -self._rng.exponential(1.0, size=(sampling.n, n_tok)).astype(np.float32)
                self.generated_tokens += sampling.n * n_tok
            out += [Sample(prompt_index=i, response_ids=ids[r].tolist(), logprobs=lps[r].tolist(), finish_reason=reason,
                           weight_version=self.weight_version) for r in range(sampling.n)]
        return out

    def pause(self, mode: str = "abort") -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def abort_all(self) -> None:
        pass

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def health(self) -> bool:
        return True


class SlowEngine:
    """A real `EmbeddedEngine` that sleeps `delay_s` before every generation (everything else delegated)."""

    def __init__(self, engine, delay_s: float):
        self._engine = engine
        self.delay_s = delay_s

    def generate(self, prompts, sampling, **kwargs):
        time.sleep(self.delay_s)
        return self._engine.generate(prompts, sampling, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def make_prebuilt_server(host: str, port: int, response_len: int, vocab_size: int, seed: int,
                         pool_size: int = 16):
    """SYNTHETIC: `/generate` answered with prebuilt reply bytes (see the module docstring).

    `pool_size` distinct random samples per response length are encoded once, in SGLang's reply
    shape (`output_ids`, `meta_info.output_token_logprobs` as [logprob, id, null] triples, finish
    reason, weight version); a reply is those encoded items joined for as many samples as the
    request asks, cached per request shape, and written to the socket as it is (`sendall` of the
    cached bytes). So a request costs the server one small `json.loads` of the request body and a
    kernel copy: what the benchmark measures is the client.
    """
    engine = RandomTokenEngine(vocab_size, response_len, 0.0, seed)
    encoded: dict[int, list[bytes]] = {}
    cache: dict[tuple, bytes] = {}
    lock = threading.Lock()

    def items_for(max_new_tokens: int) -> list[bytes]:
        if max_new_tokens not in encoded:
            samples = engine.generate([[1]], SamplingParams(n=pool_size, max_new_tokens=max_new_tokens))
            encoded[max_new_tokens] = [json.dumps({"text": "", "output_ids": s.response_ids, "meta_info": {
                "id": f"synthetic-{k}", "finish_reason": {"type": s.finish_reason}, "prompt_tokens": 1,
                "completion_tokens": len(s.response_ids), "cached_tokens": 0,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(s.logprobs, s.response_ids)],
                "weight_version": "synthetic"}}).encode() for k, s in enumerate(samples)]
        return encoded[max_new_tokens]

    def reply(body: dict) -> bytes:
        prompts = body["input_ids"]
        batch = bool(prompts) and isinstance(prompts[0], list)
        raw_sp = body.get("sampling_params", {})
        per_entry = isinstance(raw_sp, list)  # seeded requests: one entry (n=1) per sample
        first = raw_sp[0] if per_entry else raw_sp
        n = 1 if per_entry else int(first.get("n", 1))
        max_new = int(first.get("max_new_tokens", 128))
        count = (len(prompts) if batch else 1) * n
        key = (count, max_new, batch)
        with lock:
            if key not in cache:
                pool = items_for(min(response_len, max_new))
                items = [pool[k % len(pool)] for k in range(count)]
                cache[key] = items[0] if count == 1 and not batch else b"[" + b", ".join(items) + b"]"
            return cache[key]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

        def do_GET(self):
            self._answer(200, b"" if self.path.startswith("/health") else b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            self._answer(200, reply(body) if self.path == "/generate" else b"{}")

        def _answer(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()  # flushes the headers; the body goes out with one sendall, never copied
            try:
                self.connection.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    from megafork.rollout.server import ServeHTTPServer  # its listen backlog takes the client's bursts

    return ServeHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
    from megafork.rollout.server import make_server

    ap = argparse.ArgumentParser(prog="python -m megafork.testing.synthetic_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default=None, help="serve this HF model (slowed by --delay-s) instead of random tokens")
    ap.add_argument("--response-len", type=int, default=2000)
    ap.add_argument("--vocab-size", type=int, default=151936)
    ap.add_argument("--delay-s", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stall-token", type=int, default=None, help="prompts starting with this token stall...")
    ap.add_argument("--stall-s", type=float, default=0.0, help="...for this long unless aborted")
    ap.add_argument("--prebuilt", action="store_true", help="answer /generate from a per-shape reply cache")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.prebuilt:
        engine = None
        server = make_prebuilt_server(args.host, args.port, args.response_len, args.vocab_size, args.seed)
    elif args.model:
        from megafork.rollout.embedded import EmbeddedEngine

        torch.set_num_threads(1)
        engine = SlowEngine(EmbeddedEngine.from_pretrained(args.model, device="cpu"), args.delay_s)
    else:
        engine = RandomTokenEngine(args.vocab_size, args.response_len, args.delay_s, args.seed, args.stall_token,
                                   args.stall_s)
    if engine is not None:
        server = make_server(engine, args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"SYNTHETIC megafork serve ({type(engine).__name__ if engine else 'prebuilt replies'}) on http://{args.host}:{server.server_address[1]}",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

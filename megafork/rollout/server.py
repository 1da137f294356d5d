"""`megafork serve`: the embedded engine behind SGLang's HTTP protocol.

    megafork serve --model HF_DIR --host 127.0.0.1 --port 30000
    python -m megafork serve --model HF_DIR --port 30000 --device cpu

Endpoints, with SGLang 0.5.23's request/response fields and semantics (`sglang/srt/entrypoints/
http_server.py`):
- GET /health, /health_generate, /model_info (old name /get_model_info), /server_info (old name
  /get_server_info);
- POST /generate (`serve_generate.py`), /abort_request, /flush_cache, /pause_generation,
  /continue_generation;
- weights (`serve_weights.py`): /begin_weight_update, /end_weight_update,
  /init_weights_update_group, /update_weights_from_distributed (per-tensor or
  `load_format="flattened_bucket"`; only inside a weight-update session, as in SGLang),
  /destroy_weights_update_group, /update_weights_from_disk, /update_weight_version,
  /get_weights_by_name, /weights_checker (action "checksum"), /release_memory_occupation and
  /resume_memory_occupation (accepted no-ops), /update_weights_from_tensor (501: SGLang's CUDA-IPC
  payload cannot be opened here).

megafork extensions (listed in `/server_info` as `megafork_extensions`, so clients can probe):
- `/get_weights_checksum` (GET or POST `{"names": [...]}`) -> `{"checksums": {name: sha256 hex}}`
  of the served weights in the engine's dtype;
- `"return_checksums": true` on `/update_weights_from_distributed` adds `"checksums"`: the sha256
  of every tensor as received, before it is cast and loaded;
- `/model_info` also reports `dtype`, `device` and `vocab_size`.

Malformed requests get HTTP 400 with a message naming the field. A rejected weight update leaves
the previous weights serving and says so. Start-up failures (busy port, unreadable model, a
tokenizer that does not load) are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from megafork.rollout import protocol
from megafork.rollout.buckets import dtype_name
from megafork.rollout.embedded import EmbeddedEngine
from megafork.rollout.serve_generate import GenerateService
from megafork.rollout.serve_weights import HttpError, WeightService
from megafork.rollout.sglang_fields import SGLANG_VERSION

log = logging.getLogger("megafork.serve")


class ServeState:
    """Everything the request handlers share: the engine, generation and weight services."""

    def __init__(self, engine: EmbeddedEngine, sync_timeout_s: float = 600.0, max_new_tokens_cap: int | None = None,
                 host: str = "127.0.0.1", port: int = 0, max_running_requests: int | None = None):
        self.engine = engine
        self.gen = GenerateService(engine, max_new_tokens_cap, max_running_requests)
        self.weights = WeightService(engine, sync_timeout_s)
        self.host, self.port = host, port
        self.startup_time = time.time()

    def model_info(self) -> dict:
        """SGLang's `/model_info` fields (`http_server.py::model_info`), plus megafork's extras."""
        cfg, engine = self.engine.config, self.engine
        path = engine.model_path or ""
        return {
            "model_path": path, "served_model_name": path,
            # SGLang reports the path it would load a tokenizer from; "" says there is none.
            "tokenizer_path": path if engine.tokenizer is not None else "",
            "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version,
            "load_format": "safetensors", "reasoning_parser": None, "tool_call_parser": None,
            "disaggregation_mode": "null", "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None),
            # megafork extensions
            "dtype": dtype_name(engine.dtype), "device": str(engine.device), "vocab_size": cfg.vocab_size,
        }

    def server_info(self) -> dict:
        """SGLang's `/server_info` fields that describe this server, plus megafork's extras."""
        info = self.model_info()
        return {
            "model_path": info["model_path"], "served_model_name": info["served_model_name"],
            "tokenizer_path": info["tokenizer_path"], "max_context_length": self.gen.context_len or 0,
            "max_total_num_tokens": None, "version": f"megafork-serve (SGLang {SGLANG_VERSION} protocol)",
            "internal_states": [{"weight_version": self.engine.weight_version, "paused": self.engine.paused,
                                 "num_running_reqs": self.gen.num_running()}],
            "host": self.host, "port": self.port, "incremental_streaming_output": False,
            "disaggregation_mode": "null", "startup_time": self.startup_time, "frontend": "megafork",
            "tp_size": 1, "pp_size": 1, "dp_size": 1, "load_format": "safetensors", "dtype": info["dtype"],
            # megafork extensions
            "backend": "megafork-embedded", "max_batch_rows": self.engine.max_batch_rows,
            "max_new_tokens_cap": self.gen.max_new_tokens_cap, "megafork_extensions": list(EXTENSIONS),
        }


#: megafork-only features a client can probe for in `/server_info` before relying on them.
EXTENSIONS = ("return_checksums", "get_weights_checksum")


def make_handler(state: ServeState):
    """The request handler class bound to `state`."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "megafork-serve"

        def log_message(self, fmt, *args):  # route access logs through logging, at debug level
            log.debug("%s - %s", self.address_string(), fmt % args)

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        do_PUT = do_POST

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            try:
                body = self._read_json()
                status, payload = self._route(method, path, body)
            except HttpError as exc:
                status, payload = exc.status, exc.payload
            except Exception as exc:  # noqa: BLE001 - never drop a connection without an answer
                log.exception("%s %s failed", method, path)
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
            self._send(status, payload)

        def _read_json(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length == 0:
                return None
            raw = self.rfile.read(length)
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise HttpError(HTTPStatus.BAD_REQUEST, {"error": {"message": f"body: invalid JSON ({exc})"}}) from exc

        def _generate(self, body):
            """`/generate`, aborted when the client disconnects while it runs."""
            gone, done = threading.Event(), threading.Event()
            watch = threading.Thread(target=_watch_disconnect, args=(self.connection, gone, done), daemon=True)
            watch.start()
            try:
                return state.gen.generate(body, disconnected=gone)
            finally:
                done.set()

        def _route(self, method: str, path: str, body):
            ok = HTTPStatus.OK
            if path in ("/health", "/ready"):
                return ok, None
            if path == "/health_generate":
                healthy = state.engine.health()
                return (ok if healthy else HTTPStatus.SERVICE_UNAVAILABLE), None
            if path in ("/model_info", "/get_model_info"):
                return ok, state.model_info()
            if path in ("/server_info", "/get_server_info"):
                return ok, state.server_info()
            weights = state.weights
            if path in GET_OR_POST:
                return ok, GET_OR_POST[path](weights, body)
            if path == "/flush_cache":
                # The embedded engine keeps no KV cache across requests, so there is nothing to flush.
                return ok, "Cache flushed.\n"
            if method != "POST":
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED if path in POST_ROUTES else HTTPStatus.NOT_FOUND,
                                {"error": {"message": f"{method} {path}: not served here"}})
            if path == "/generate":
                return ok, self._generate(body)
            if path == "/abort_request":
                state.gen.abort(body)
                return ok, None
            if path == "/pause_generation":
                try:
                    mode = protocol.parse_pause(body)
                except protocol.BadRequest as exc:
                    raise HttpError(HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}}) from exc
                state.engine.pause(mode)
                return ok, {"message": "Generation paused successfully.", "status": "ok"}
            if path == "/continue_generation":
                state.engine.resume()
                return ok, {"message": "Generation continued successfully.", "status": "ok"}
            if path in POST_ONLY:
                return ok, POST_ONLY[path](weights, body)
            raise HttpError(HTTPStatus.NOT_FOUND, {"error": {"message": f"{path}: no such endpoint"}})

        def _send(self, status: int, payload) -> None:
            if payload is None:
                data, ctype = b"", "text/plain"
            elif isinstance(payload, str):
                data, ctype = payload.encode(), "text/plain"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            try:
                self.send_response(int(status))
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                log.warning("client went away before the %d response was sent", int(status))

    return Handler


def _watch_disconnect(conn: socket.socket, gone: threading.Event, done: threading.Event) -> None:
    """Set `gone` when the client closes its end of `conn` before `done` (the answer is ready).

    The request body has been read, so a readable socket with nothing to read means EOF.
    """
    while not done.is_set():
        try:
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                gone.set()
                return
            if readable:
                time.sleep(0.1)  # pipelined bytes of a next request: not a disconnect
        except (OSError, ValueError):
            gone.set()
            return


# Weight endpoints served on GET and POST (as SGLang's `api_route(..., methods=["GET", "POST"])`).
GET_OR_POST = {
    "/get_weights_checksum": WeightService.checksums,
    "/get_weights_by_name": WeightService.get_weights_by_name,
    "/weights_checker": WeightService.weights_checker,
    "/release_memory_occupation": lambda w, b: w.memory(b, release=True),
    "/resume_memory_occupation": lambda w, b: w.memory(b, release=False),
}
POST_ONLY = {
    "/begin_weight_update": WeightService.begin,
    "/end_weight_update": WeightService.end,
    "/init_weights_update_group": WeightService.init_group,
    "/destroy_weights_update_group": WeightService.destroy_group,
    "/update_weights_from_distributed": WeightService.update_from_distributed,
    "/update_weights_from_tensor": WeightService.update_from_tensor,
    "/update_weights_from_disk": WeightService.update_from_disk,
    "/update_weight_version": WeightService.update_weight_version,
}
POST_ROUTES = {"/generate", "/abort_request", "/pause_generation", "/continue_generation", *POST_ONLY}


class ServeHTTPServer(ThreadingHTTPServer):
    """One thread per request, with a listen backlog for the streaming client's bursts.

    socketserver's default backlog is 5: a trainer opening `rollout.max_inflight_per_server`
    (default 64) connections at once got some of them reset before they were accepted.
    """

    request_queue_size = 1024
    daemon_threads = True


def make_server(engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0, sync_timeout_s: float = 600.0,
                max_new_tokens_cap: int | None = None, max_running_requests: int | None = None) -> ServeHTTPServer:
    """An HTTP server (not yet serving) for `engine`; `port=0` picks a free port.

    Args:
        engine: the embedded engine to serve.
        host: bind address.
        port: TCP port (0: any free port; read it from `server.server_address`).
        sync_timeout_s: timeout of weight-update groups (rendezvous and broadcasts).
        max_new_tokens_cap: refuse requests asking for more new tokens (None: only the context bounds).
        max_running_requests: `/generate` calls generating at once; later ones wait (None: no limit).
    """
    state = ServeState(engine, sync_timeout_s, max_new_tokens_cap, host, port, max_running_requests)
    server = ServeHTTPServer((host, port), make_handler(state))
    state.port = server.server_address[1]
    return server


def main(argv: list[str] | None = None) -> int:
    """`megafork serve` entry point."""
    ap = argparse.ArgumentParser(prog="megafork serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bf16 on CUDA, the checkpoint's dtype on CPU")
    ap.add_argument("--max-batch-rows", type=int, default=64, help="rows (prompts x n) per forward batch")
    ap.add_argument("--max-new-tokens-cap", type=int, default=None,
                    help="refuse requests with a larger max_new_tokens (default: only the model's context bounds)")
    ap.add_argument("--max-running-requests", type=int, default=None,
                    help="/generate calls generating at once; later ones wait in arrival order and an abort ends "
                         "a waiting one at once, as SGLang's waiting queue (default: no limit)")
    ap.add_argument("--weight-sync-timeout", type=float, default=600.0,
                    help="seconds before a weight-update rendezvous or broadcast fails")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.max_new_tokens_cap is not None and args.max_new_tokens_cap < 1:
        return _startup_error(f"--max-new-tokens-cap: expected an integer >= 1, found {args.max_new_tokens_cap}")
    if args.max_running_requests is not None and args.max_running_requests < 1:
        return _startup_error(f"--max-running-requests: expected an integer >= 1, found {args.max_running_requests}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        # Bind first: a busy port should not cost a model load.
        server = ServeHTTPServer((args.host, args.port), BaseHTTPRequestHandler)  # handler set once loaded
    except OSError as exc:
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        return _startup_error(f"cannot listen on {args.host}:{args.port}: {reason}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a server's stderr is a log, not a terminal
    try:
        engine = EmbeddedEngine.from_pretrained(args.model, device=args.device, dtype=dtype,
                                                max_batch_rows=args.max_batch_rows)
    except Exception as exc:  # noqa: BLE001 - one line naming the model, not a traceback
        server.server_close()
        return _startup_error(f"cannot load --model {args.model}: {type(exc).__name__}: {_one_line(exc)}")
    host, port = server.server_address[:2]
    server.RequestHandlerClass = make_handler(ServeState(engine, args.weight_sync_timeout, args.max_new_tokens_cap,
                                                         host, port, args.max_running_requests))

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"megafork serve: {args.model} on {engine.device} ({dtype_name(engine.dtype)}), "
          f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "..."


def _startup_error(message: str) -> int:
    print(f"megafork serve: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

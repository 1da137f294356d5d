"""`megafork serve`: the embedded engine behind SGLang's HTTP protocol.

    megafork serve --model HF_DIR --host 127.0.0.1 --port 30000
    python -m megafork serve --model HF_DIR --port 30000 --device cpu

Endpoints, with SGLang 0.5.23's request/response fields and semantics (`sglang/srt/entrypoints/
http_server.py`): GET /health, /health_generate, /get_model_info (= /model_info), /get_server_info;
POST /generate, /flush_cache, /pause_generation, /continue_generation, /update_weights_from_disk,
/init_weights_update_group, /update_weights_from_distributed (per-tensor broadcasts or
`load_format="flattened_bucket"`), /destroy_weights_update_group.

megafork extensions (not in SGLang):
- `/get_weights_checksum` (GET or POST `{"names": [...]}`) -> `{"checksums": {name: sha256 hex}}`
  of the served weights in the engine's dtype;
- `"return_checksums": true` on `/update_weights_from_distributed` adds `"checksums"`: the sha256
  of every tensor as received, before it is cast and loaded;
- `/get_model_info` also reports `dtype`, `device` and `vocab_size`.

Malformed requests get HTTP 400 with a message naming the field. A rejected weight update leaves
the previous weights serving and says so.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

from megafork.rollout import protocol
from megafork.rollout.buckets import Slot, dtype_name, layout, tensor_checksum, views
from megafork.rollout.embedded import EmbeddedEngine, WeightUpdateError
from megafork.rollout.process_group import destroy_weight_update_group, init_weight_update_group
from megafork.rollout.types import validate_prompts

log = logging.getLogger("megafork.serve")
KEPT = "The previous weights are still serving."


class HttpError(Exception):
    def __init__(self, status: int, payload: dict):
        super().__init__(payload)
        self.status, self.payload = status, payload


def _fail(message: str, status: int = HTTPStatus.BAD_REQUEST) -> HttpError:
    return HttpError(status, {"success": False, "message": message})


class ServeState:
    """Everything the request handlers share: the engine and the weight-update groups."""

    def __init__(self, engine: EmbeddedEngine, sync_timeout_s: float = 600.0):
        self.engine = engine
        self.sync_timeout_s = sync_timeout_s
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.groups_lock = threading.Lock()
        # Broadcasts on one group must be received in the order the trainer sends them.
        self.receive_lock = threading.Lock()
        self._recv_buf: torch.Tensor | None = None

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 receive buffer of `nbytes`. On CPU one buffer is kept and grown: there is no
        caching allocator there, so a fresh one would page-fault on every update."""
        device = self.engine.device
        if device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        if self._recv_buf is None or self._recv_buf.numel() < nbytes:
            self._recv_buf = None
            self._recv_buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._recv_buf[:nbytes]

    # ------------------------------------------------------------------ generate

    def generate(self, body) -> object:
        try:
            req = protocol.parse_generate(body)
        except (protocol.BadRequest, ValueError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}}) from exc
        engine = self.engine
        tok = engine.tokenizer
        try:
            if req.prompts is None:
                if tok is None:
                    raise ValueError(f"text: {engine.model_path} has no tokenizer; send input_ids instead")
                prompts = [tok.encode(t) for t in req.texts]
                prompts = validate_prompts(prompts, engine.config.vocab_size, "text")
            else:
                prompts = validate_prompts(req.prompts, engine.config.vocab_size)
        except ValueError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, {"error": {"message": str(exc)}}) from exc

        if all(s is req.sampling[0] for s in req.sampling):
            samples = engine.generate(prompts, req.sampling[0])
        else:
            samples = []
            for i, (p, sp) in enumerate(zip(prompts, req.sampling)):
                for s in engine.generate([p], sp):
                    s.prompt_index = i
                    samples.append(s)
        items = []
        for k, s in enumerate(samples):
            i = s.prompt_index
            sp = req.sampling[i]
            meta = {
                "id": (req.rids[i] if req.rids else f"megafork-{id(req):x}-{i}") + (f"-{k % sp.n}" if sp.n > 1 else ""),
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
            items.append({"text": text, "output_ids": s.response_ids, "meta_info": meta})
        return items[0] if req.is_single else items

    # ------------------------------------------------------------------ weights

    def init_group(self, body) -> dict:
        try:
            req = protocol.parse_init_group(body)
        except protocol.BadRequest as exc:
            raise _fail(str(exc)) from exc
        with self.groups_lock:
            if req.group_name in self.groups:
                raise _fail(f"group_name: a weight-update group named {req.group_name!r} already exists; "
                            "destroy it first")
            if req.backend == "nccl" and not torch.cuda.is_available():
                raise _fail("backend: 'nccl' needs CUDA, and this server runs on CPU; use backend='gloo'")
            try:
                pg = init_weight_update_group(req.master_address, req.master_port, req.rank_offset, req.world_size,
                                              req.group_name, req.backend, self.sync_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the client must hear why
                raise _fail(f"Failed to initialize custom process group: {exc}.") from exc
            self.groups[req.group_name] = pg
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_group(self, body) -> dict:
        try:
            name = protocol.parse_group_name(body, "/destroy_weights_update_group")
        except protocol.BadRequest as exc:
            raise _fail(str(exc)) from exc
        with self.groups_lock:
            pg = self.groups.pop(name, None)
        if pg is None:
            raise _fail(f"group_name: the group {name!r} to be destroyed does not exist.")
        destroy_weight_update_group(pg)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_from_distributed(self, body) -> dict:
        try:
            req = protocol.parse_distributed_update(body)
            slots = layout(req.names, req.dtypes, req.shapes) if req.load_format == "flattened_bucket" else None
        except ValueError as exc:
            raise _fail(f"{exc} (nothing was received; the sender's broadcast will time out)") from exc
        pg = self.groups.get(req.group_name)
        if pg is None:
            raise _fail(f"group_name: no weight-update group named {req.group_name!r}; "
                        "call /init_weights_update_group first")
        t0 = time.perf_counter()
        with self.receive_lock:
            # Validate before receiving: a bad update is still received (the trainer's broadcast
            # must complete), then rejected with the old weights untouched.
            try:
                dests, problem = self.engine.check_update(zip(req.names, req.shapes, req.dtypes)), None
            except WeightUpdateError as exc:
                dests, problem = None, exc
            if req.abort_all_requests and problem is None:
                self.engine.abort_all()
            if slots is None and problem is None:
                out = self._receive_in_place(req, pg, dests)
                t1 = time.perf_counter()
            else:
                if slots is None:
                    slots = _padded_slots(req)
                buf = self._buffer(slots[-1].end)
                if req.load_format == "flattened_bucket":
                    dist.broadcast(buf, group_src=0, group=pg)
                else:
                    for w in [dist.broadcast(t, group_src=0, group=pg, async_op=True) for t in views(buf, slots)]:
                        w.wait()
                tensors = [(sl.name, t) for sl, t in zip(slots, views(buf, slots))]
                t1 = time.perf_counter()
                if problem is not None:
                    raise _fail(f"Failed to update weights: {problem}. {KEPT}")
                out = {"checksums": {n: tensor_checksum(t) for n, t in tensors}} if req.return_checksums else {}
                # Inside the lock: the tensors are views of the shared receive buffer.
                self.engine.update_weights(tensors, weight_version=req.weight_version)
        nbytes = sum(d.itemsize * math.prod(sh) for d, sh in zip(req.dtypes, req.shapes))
        log.info("update_weights_from_distributed: %d tensors, %.1f MiB received in %.3f s, loaded in %.3f s",
                 len(req.names), nbytes / 2**20, t1 - t0, time.perf_counter() - t1)
        return {"success": True, "message": "Succeeded to update parameter online.", **out}

    def _receive_in_place(self, req, pg, dests: dict[str, torch.Tensor]) -> dict:
        """Per-tensor broadcasts land directly in the weights they replace (when dtype and layout
        allow; others go through a buffer and are cast). The update was validated first, so only
        a transport failure can leave it half done, and the answer then says so."""
        slots = _padded_slots(req)
        staged = [sl for sl in slots if not (dests[sl.name].dtype == sl.dtype and dests[sl.name].is_contiguous())]
        buf = self._buffer(max([sl.end for sl in staged], default=0))
        staged_views = dict(zip([sl.name for sl in staged], views(buf, staged)))
        recv = [staged_views.get(n, dests[n]) for n in req.names]
        with self.engine.writing_weights(req.weight_version):
            try:
                for w in [dist.broadcast(t, group_src=0, group=pg, async_op=True) for t in recv]:
                    w.wait()
            except Exception as exc:  # noqa: BLE001 - report the partial state instead of hiding it
                raise _fail(f"Failed to receive weights: {exc}. The weights are partially updated; "
                            "send a full update again.", HTTPStatus.INTERNAL_SERVER_ERROR) from exc
            out = {"checksums": {n: tensor_checksum(t) for n, t in zip(req.names, recv)}} if req.return_checksums else {}
            for name, t in staged_views.items():
                dests[name].copy_(t)
        return out

    def update_from_disk(self, body) -> dict:
        try:
            req = protocol.parse_disk_update(body)
        except protocol.BadRequest as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, {"success": False, "message": str(exc), "num_paused_requests": 0}) from exc
        if req.abort_all_requests:
            self.engine.abort_all()
        try:
            self.engine.load_from_disk(req.model_path, weight_version=req.weight_version)
        except (WeightUpdateError, OSError, ValueError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, {"success": False, "num_paused_requests": 0,
                                                     "message": f"Failed to update weights: {exc}. {KEPT}"}) from exc
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def checksums(self, body) -> dict:
        try:
            names = protocol.parse_checksum_request(body)
            sums = self.engine.weights_checksum(names)
        except (protocol.BadRequest, WeightUpdateError) as exc:
            raise _fail(str(exc)) from exc
        return {"checksums": sums, "dtype": dtype_name(self.engine.dtype), "weight_version": self.engine.weight_version}

    # ------------------------------------------------------------------ info

    def model_info(self) -> dict:
        cfg = self.engine.config
        return {
            "model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path if self.engine.tokenizer else None,
            "is_generation": True, "weight_version": self.engine.weight_version, "load_format": "safetensors",
            "model_type": getattr(cfg, "model_type", None), "architectures": getattr(cfg, "architectures", None),
            "dtype": dtype_name(self.engine.dtype), "device": str(self.engine.device), "vocab_size": cfg.vocab_size,
        }

    def server_info(self) -> dict:
        return {**self.model_info(), "tp_size": 1, "pp_size": 1, "dp_size": 1, "backend": "megafork-embedded",
                "max_batch_rows": self.engine.max_batch_rows}


def _padded_slots(req) -> list[Slot]:
    """Buffer layout for per-tensor receives: each tensor at a 16-byte aligned offset."""
    slots, offset = [], 0
    for n, d, shape in zip(req.names, req.dtypes, req.shapes):
        offset = -(-offset // 16) * 16
        slots.append(Slot(n, d, shape, offset, offset + d.itemsize * math.prod(shape)))
        offset = slots[-1].end
    return slots


def _finish_reason(sample, sp) -> dict:
    if sample.finish_reason == "stop":
        return {"type": "stop", "matched": sample.response_ids[-1]}
    if sample.finish_reason == "length":
        return {"type": "length", "length": sp.max_new_tokens}
    return {"type": "abort", "message": "Generation was aborted by /pause_generation or a weight update."}


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

        def _route(self, method: str, path: str, body):
            ok = HTTPStatus.OK
            if path in ("/health", "/ready"):
                return ok, None
            if path == "/health_generate":
                healthy = state.engine.health()
                return (ok if healthy else HTTPStatus.SERVICE_UNAVAILABLE), None
            if path in ("/get_model_info", "/model_info"):
                return ok, state.model_info()
            if path in ("/get_server_info", "/server_info"):
                return ok, state.server_info()
            if path == "/get_weights_checksum":
                return ok, state.checksums(body)
            if path == "/flush_cache":
                # The embedded engine keeps no KV cache across requests, so there is nothing to flush.
                return ok, "Cache flushed.\n"
            if method != "POST":
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED if path in POST_ROUTES else HTTPStatus.NOT_FOUND,
                                {"error": {"message": f"{method} {path}: not served here"}})
            if path == "/generate":
                return ok, state.generate(body)
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
            if path == "/init_weights_update_group":
                return ok, state.init_group(body)
            if path == "/destroy_weights_update_group":
                return ok, state.destroy_group(body)
            if path == "/update_weights_from_distributed":
                return ok, state.update_from_distributed(body)
            if path == "/update_weights_from_disk":
                return ok, state.update_from_disk(body)
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


POST_ROUTES = {"/generate", "/pause_generation", "/continue_generation", "/init_weights_update_group",
               "/destroy_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_disk"}


def make_server(engine: EmbeddedEngine, host: str = "127.0.0.1", port: int = 0,
                sync_timeout_s: float = 600.0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for `engine`; `port=0` picks a free port.

    Args:
        engine: the embedded engine to serve.
        host: bind address.
        port: TCP port (0: any free port; read it from `server.server_address`).
        sync_timeout_s: timeout of weight-update groups (rendezvous and broadcasts).
    """
    server = ThreadingHTTPServer((host, port), make_handler(ServeState(engine, sync_timeout_s)))
    server.daemon_threads = True
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
    ap.add_argument("--weight-sync-timeout", type=float, default=600.0,
                    help="seconds before a weight-update rendezvous or broadcast fails")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        engine = EmbeddedEngine.from_pretrained(args.model, device=args.device, dtype=dtype,
                                                max_batch_rows=args.max_batch_rows)
    except (OSError, ValueError) as exc:
        print(f"megafork serve: {exc}", file=sys.stderr)
        return 2
    server = make_server(engine, args.host, args.port, args.weight_sync_timeout)
    host, port = server.server_address[:2]

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


if __name__ == "__main__":
    sys.exit(main())

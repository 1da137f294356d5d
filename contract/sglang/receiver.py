"""SGLang 0.5.23's weight-receiving path behind HTTP, run from the wheel on CPU.

    PYTHONPATH=.sglang-contract/site .venv/bin/python contract/sglang/receiver.py --model HF_DIR --port 31000

What runs is SGLang's own code:
- request bodies are validated into `io_struct` classes by pydantic, as FastAPI does for
  `http_server.py`'s routes (`msgspec_struct_pydantic_core_schema`);
- `SchedulerWeightUpdaterManager` (`scheduler_components/weight_updater.py`): the session guard,
  `begin_weight_update` / `end_weight_update`, `update_weights_from_distributed`;
- the model runner's `WeightUpdater` (`model_runner_components/weight_updater.py`):
  `init_weights_update_group` through `init_custom_process_group`, the per-tensor receive and the
  flattened-bucket receive through `FlattenedTensorBucket`;
- the answers and status codes of `http_server.py`'s routes (200 on success, else 400).

What is not SGLang's: the model is transformers' Qwen3 with a `load_weights(named_tensors)` that
copies by HF name (SGLang's Qwen3 fuses qkv/gate_up and needs its CUDA layers); the tokenizer
manager's ZMQ relay between route and scheduler is a direct call under one lock (the scheduler
handles one control request at a time); the two `TpModelWorker` one-line delegations are written
out; the manager is built without its `__post_init__`, which only reads the TP CPU group from the
published runtime context, and is given the 1-rank gloo group instead; the one runtime-context
leaf the updater reads (`model.weight_cache_mode`) is published as "off", SGLang's default.
`/contract/checksums` (sha256 per weight) is this harness's own, for the test to read back.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_env  # noqa: E402,F401  (must precede every sglang import)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from pydantic import TypeAdapter, ValidationError  # noqa: E402
from sglang.srt.managers import io_struct as io  # noqa: E402
from sglang.srt.managers.scheduler_components.weight_updater import SchedulerWeightUpdaterManager  # noqa: E402
from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater  # noqa: E402
from sglang.srt.runtime_context import _ConfigBag, get_context  # noqa: E402


class HFModel(torch.nn.Module):
    """transformers' causal LM with SGLang's model interface for weight loading."""

    def __init__(self, hf_dir: str):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.inner = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def load_weights(self, named_tensors):
        state = self.inner.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"{name} is not a parameter of this model")
                state[name].copy_(tensor)


class _Worker:
    """`TpModelWorker`'s weight methods (two delegations, as in `managers/tp_worker.py`)."""

    def __init__(self, runner):
        self.model_runner = runner

    def init_weights_update_group(self, recv_req):
        return self.model_runner.weight_updater.init_weights_update_group(
            recv_req.master_address, recv_req.master_port, recv_req.rank_offset, recv_req.world_size,
            recv_req.group_name, recv_req.backend)

    def destroy_weights_update_group(self, recv_req):
        return self.model_runner.weight_updater.destroy_weights_update_group(recv_req.group_name)

    def weight_update_runners(self):
        return [("target", self.model_runner)]


class _Runner:
    def __init__(self, updater):
        self.weight_updater = updater


class _Scheduler:
    def __init__(self):
        self.weight_version = "default"

    def record_weight_version_change(self, new_version=None):
        if new_version is not None:
            self.weight_version = new_version


def build(hf_dir: str):
    """The model, SGLang's two weight updaters wired as in the scheduler, and the scheduler stub."""
    if not dist.is_initialized():  # SGLang's scheduler always has its default group (TP=1 here)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    bag = _ConfigBag("model")
    bag._set("weight_cache_mode", "off")
    ctx = get_context()
    ctx._config_bags = {**(ctx._config_bags or {}), "model": bag}
    model = HFModel(hf_dir)
    updater = WeightUpdater(tp_rank=0, device="cpu", gpu_id=0, model_config=None, custom_weight_loaders={},
                            get_model=lambda: model, update_model_fields=lambda *a, **k: None,
                            recapture_cuda_graph=lambda: None, get_model_runner=lambda: None)
    scheduler = _Scheduler()
    manager = object.__new__(SchedulerWeightUpdaterManager)
    for name, value in dict(tp_worker=_Worker(_Runner(updater)), draft_worker=None, memory_saver_adapter=None,
                            flush_cache=lambda empty_cache=False: True, is_fully_idle=lambda **kw: True,
                            scheduler=scheduler, metrics_collector=None, offload_tags=set(),
                            stashed_model_static_state=None, _session=None,
                            tp_cpu_group=dist.group.WORLD).items():
        object.__setattr__(manager, name, value)
    return model, manager, scheduler


ROUTES = {
    "/init_weights_update_group": (io.InitWeightsUpdateGroupReqInput, "init_weights_update_group"),
    "/destroy_weights_update_group": (io.DestroyWeightsUpdateGroupReqInput, "destroy_weights_update_group"),
    "/begin_weight_update": (io.BeginWeightUpdateReqInput, "begin_weight_update"),
    "/end_weight_update": (io.EndWeightUpdateReqInput, "end_weight_update"),
    "/update_weights_from_distributed": (io.UpdateWeightsFromDistributedReqInput, "update_weights_from_distributed"),
}


def make_server(model, manager, scheduler, port: int) -> ThreadingHTTPServer:
    lock = threading.Lock()
    adapters = {path: TypeAdapter(cls) for path, (cls, _) in ROUTES.items()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/contract/checksums":
                with lock:
                    sums = {n: hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                            for n, t in model.inner.state_dict().items()}
                return self._answer(200, {"checksums": sums, "weight_version": scheduler.weight_version})
            if self.path == "/health":
                return self._answer(200, {})
            self._answer(404, {"detail": "Not Found"})

        def do_POST(self):
            if self.path not in ROUTES:
                return self._answer(404, {"detail": "Not Found"})
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            try:
                req = adapters[self.path].validate_python(body)
            except ValidationError as exc:  # FastAPI's answer to a body its model refuses
                return self._answer(422, {"detail": json.loads(exc.json())})
            try:
                with lock:
                    out = getattr(manager, ROUTES[self.path][1])(req)
            except Exception as exc:  # noqa: BLE001 - what the server would log; the test sees a 500
                traceback.print_exc()
                return self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
            if isinstance(out, tuple):  # the tp_worker-level calls answer (success, message)
                success, message = out
            else:
                success, message = out.success, out.message
            self._answer(200 if success else 400, {"success": success, "message": message})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    server = make_server(*build(args.model), args.port)
    print(f"sglang receiver listening on {args.port}", flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

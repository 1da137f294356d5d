"""`megafork serve`'s weight endpoints, with SGLang 0.5.23's semantics.

- The weight-update session: `/begin_weight_update` opens it, `/end_weight_update` closes it,
  and `/update_weights_from_distributed` / `/update_weights_from_tensor` outside it are refused
  (HTTP 400, before anything is received) with SGLang's own message, so a client that forgets the
  session fails here as it would against SGLang (`scheduler_components/weight_updater.py`).
- Weight-update groups, per-tensor and flattened-bucket receives, updates from disk (every
  expected tensor must arrive, or nothing changes), `/update_weight_version`,
  `/get_weights_by_name`, `/weights_checker` (action "checksum", SGLang's hash and response
  shape), `/release_memory_occupation` / `/resume_memory_occupation` (no-ops on this engine, and
  the answer says so), and `/update_weights_from_tensor`, answered 501: its payload is SGLang's
  `MultiprocessingSerializer` (pickled CUDA IPC handles) which a CPU server cannot open.

Every method returns `(status, payload)` or raises `HttpError`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from http import HTTPStatus

import torch
import torch.distributed as dist

from megafork.rollout import protocol
from megafork.rollout.buckets import Slot, dtype_name, layout, tensor_checksum, views
from megafork.rollout.embedded import EmbeddedEngine, WeightUpdateError
from megafork.rollout.process_group import destroy_weight_update_group, init_weight_update_group

log = logging.getLogger("megafork.serve")
KEPT = "The previous weights are still serving."


class HttpError(Exception):
    """An HTTP error answer: status and JSON payload."""

    def __init__(self, status: int, payload: dict):
        super().__init__(payload)
        self.status, self.payload = status, payload


def fail(message: str, status: int = HTTPStatus.BAD_REQUEST) -> HttpError:
    """SGLang's `{success: false, message}` error answer."""
    return HttpError(status, {"success": False, "message": message})


def error(message: str, status: int = HTTPStatus.BAD_REQUEST) -> HttpError:
    """SGLang's `{error: {message}}` error answer (`_create_error_response`)."""
    return HttpError(status, {"error": {"message": message}})


def sglang_tensor_hash(tensor: torch.Tensor) -> str:
    """SGLang's per-tensor weight checksum (`weight_checker._hash_tensor` on CPU): the first 8
    bytes of the sha256 of the raw bytes, as 16 hex digits."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()[:16]


def overall_checksum(checksums: dict[str, str]) -> str:
    """SGLang's `per_gpu_checksum`: sha256 over (name, checksum) in name order."""
    h = hashlib.sha256()
    for name in sorted(checksums):
        h.update(name.encode())
        h.update(checksums[name].encode())
    return h.hexdigest()


class WeightService:
    """Weight updates of one `EmbeddedEngine` (groups, the session, receives, disk, checks)."""

    def __init__(self, engine: EmbeddedEngine, sync_timeout_s: float = 600.0):
        self.engine = engine
        self.sync_timeout_s = sync_timeout_s
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.groups_lock = threading.Lock()
        # Broadcasts on one group must be received in the order the trainer sends them.
        self.receive_lock = threading.Lock()
        self._recv_buf: torch.Tensor | None = None
        self.session: str | None = None  # the open session's selector
        self.session_lock = threading.Lock()
        self.released: set[str] = set()

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

    # ------------------------------------------------------------------ session

    def begin(self, body) -> dict:
        try:
            selector = protocol.parse_selector(body, "/begin_weight_update")
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        with self.session_lock:
            if self.session is not None:
                raise fail("a weight-update session is already open; call end_weight_update() first")
            self.session = selector
        return {"success": True, "message": "Success"}

    def end(self, body) -> dict:
        try:
            protocol.parse_request("EndWeightUpdateReqInput", body, "/end_weight_update")
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        with self.session_lock:
            if self.session is None:
                raise fail("no weight-update session is open; call begin_weight_update() first")
            self.session = None
        return {"success": True, "message": "Success"}

    def _require_session(self, endpoint: str) -> None:
        if self.session is None:
            raise fail(f"{endpoint} must run between begin_weight_update() and end_weight_update()")

    # ------------------------------------------------------------------ groups

    def init_group(self, body) -> dict:
        try:
            req = protocol.parse_init_group(body)
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        with self.groups_lock:
            if req.group_name in self.groups:
                raise fail(f"group_name: a weight-update group named {req.group_name!r} already exists; "
                           "destroy it first")
            if req.backend == "nccl" and not torch.cuda.is_available():
                raise fail("backend: 'nccl' needs CUDA, and this server runs on CPU; use backend='gloo'")
            try:
                pg = init_weight_update_group(req.master_address, req.master_port, req.rank_offset, req.world_size,
                                              req.group_name, req.backend, self.sync_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the client must hear why
                raise fail(f"Failed to initialize custom process group: {exc}.") from exc
            self.groups[req.group_name] = pg
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_group(self, body) -> dict:
        try:
            name = protocol.parse_group_name(body, "/destroy_weights_update_group")
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        with self.groups_lock:
            pg = self.groups.pop(name, None)
        if pg is None:
            raise fail(protocol.GROUP_ABSENT)  # SGLang's words: a trainer tolerates them before its init
        destroy_weight_update_group(pg)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    # ------------------------------------------------------------------ updates

    def update_from_distributed(self, body) -> dict:
        try:
            req = protocol.parse_distributed_update(body)
            slots = layout(req.names, req.dtypes, req.shapes) if req.load_format == "flattened_bucket" else None
        except ValueError as exc:
            raise fail(f"{exc} (nothing was received; the sender's broadcast will time out)") from exc
        self._require_session("update_weights_from_distributed")
        pg = self.groups.get(req.group_name)
        if pg is None:
            raise fail(f"group_name: no weight-update group named {req.group_name!r}; "
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
                    raise fail(f"Failed to update weights: {problem}. {KEPT}")
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
                raise fail(f"Failed to receive weights: {exc}. The weights are partially updated; "
                           "send a full update again.", HTTPStatus.INTERNAL_SERVER_ERROR) from exc
            out = {"checksums": {n: tensor_checksum(t) for n, t in zip(req.names, recv)}} if req.return_checksums else {}
            for name, t in staged_views.items():
                dests[name].copy_(t)
        return out

    def update_from_tensor(self, body) -> tuple[int, dict]:
        try:
            protocol.parse_request("UpdateWeightsFromTensorReqInput", body, "/update_weights_from_tensor")
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        self._require_session("update_weights_from_tensor")
        raise fail("update_weights_from_tensor is not implemented by megafork serve: its payload is SGLang's "
                   "MultiprocessingSerializer (pickled CUDA IPC handles of a colocated trainer), which this "
                   "server cannot open. Use /update_weights_from_distributed. " + KEPT, HTTPStatus.NOT_IMPLEMENTED)

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

    def update_weight_version(self, body) -> dict:
        try:
            req = protocol.parse_request("UpdateWeightVersionReqInput", body, "/update_weight_version")
            version = req.get("new_version")
            protocol.want(isinstance(version, str), "new_version", "a string", version)
        except protocol.BadRequest as exc:
            raise fail(f"Failed to update weight version: {exc}") from exc
        if req.get("abort_all_requests", True):
            self.engine.abort_all()
        with self.engine.writing_weights(version):
            pass
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}

    # ------------------------------------------------------------------ reading weights

    def checksums(self, body) -> dict:
        """megafork extension: sha256 of every (or the named) served weight(s)."""
        try:
            names = protocol.parse_checksum_request(body)
            sums = self.engine.weights_checksum(names)
        except (protocol.BadRequest, WeightUpdateError) as exc:
            raise fail(str(exc)) from exc
        return {"checksums": sums, "dtype": dtype_name(self.engine.dtype), "weight_version": self.engine.weight_version}

    def weights_checker(self, body) -> dict:
        """SGLang's `/weights_checker`; only `action="checksum"` is implemented here."""
        try:
            req = protocol.parse_request("CheckWeightsReqInput", body, "/weights_checker")
        except protocol.BadRequest as exc:
            raise fail(str(exc)) from exc
        action = req.get("action", "checksum")
        if action != "checksum":
            raise fail(f"action: megafork serve implements only 'checksum', found {action!r}")
        skip = req.get("skip_tensor_list") or []
        with self.engine.writing_weights():
            sums = {n: sglang_tensor_hash(t) for n, t in self.engine.model.state_dict().items()
                    if not any(s in n for s in skip)}
        per_gpu = overall_checksum(sums)
        info = {"role": "target", "tp_rank": 0, "tp_size": 1, "dp_rank": 0, "dp_size": 1, "pp_rank": 0,
                "pp_size": 1, "rank": 0, "size": 1}
        return {"success": True, "message": "Success.",
                "ranks": [{"checksums": sums, "per_gpu_checksum": per_gpu, "parallelism_info": [info]}],
                "per_engine_checksum": hashlib.sha256(per_gpu.encode()).hexdigest()}

    def get_weights_by_name(self, body) -> list:
        """SGLang's `/get_weights_by_name`: the first `truncate_size` rows (or values) as floats."""
        try:
            req = protocol.parse_request("GetWeightsByNameReqInput", body, "/get_weights_by_name")
            name, size = req.get("name"), req.get("truncate_size", 100)
            protocol.want(isinstance(name, str), "name", "a tensor name", name)
            protocol.want(protocol.is_int(size) and size >= 0, "truncate_size", "an integer >= 0", size)
        except protocol.BadRequest as exc:
            raise error(str(exc)) from exc
        state = self.engine.model.state_dict()
        if name not in state:
            raise error(f"name: {name!r} is not a tensor of this model (HF names such as {sorted(state)[:3]})")
        with self.engine.writing_weights():
            return state[name].detach().float().cpu().tolist()[:size]

    # ------------------------------------------------------------------ memory

    def memory(self, body, release: bool) -> dict:
        """Accepted and recorded; the embedded engine keeps its weights and has no KV pool to free.

        SGLang answers these with an empty body; this answer says that nothing was freed.
        """
        endpoint = "/release_memory_occupation" if release else "/resume_memory_occupation"
        cls = "ReleaseMemoryOccupationReqInput" if release else "ResumeMemoryOccupationReqInput"
        try:
            req = protocol.parse_request(cls, body, endpoint)
            tags = req.get("tags") or ["kv_cache", "weights", "cuda_graph"]
            protocol.want(isinstance(tags, list) and all(isinstance(t, str) for t in tags), "tags",
                          "a list of strings", tags)
        except protocol.BadRequest as exc:
            raise error(str(exc)) from exc
        (self.released.update if release else self.released.difference_update)(tags)
        message = (f"{endpoint} {tags}: accepted as a no-op: megafork serve keeps its weights in place and has no "
                   "KV-cache pool or CUDA graphs to free")
        log.warning(message)
        return {"success": True, "message": message, "released": sorted(self.released)}


def _padded_slots(req) -> list[Slot]:
    """Buffer layout for per-tensor receives: each tensor at a 16-byte aligned offset."""
    slots, offset = [], 0
    for n, d, shape in zip(req.names, req.dtypes, req.shapes):
        offset = -(-offset // 16) * 16
        slots.append(Slot(n, d, shape, offset, offset + d.itemsize * math.prod(shape)))
        offset = slots[-1].end
    return slots

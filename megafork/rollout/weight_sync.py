"""Trainer -> rollout weight sync: HF-named full tensors, in buckets, over SGLang's protocol.

On trainer rank 0 (every trainer rank runs the export, whose TP gathers are collective):

    sender = HttpWeightSender(["http://10.0.0.5:30000"], WeightSyncConfig(bucket_bytes=512 << 20))
    sender.connect()                                   # /init_weights_update_group + local rendezvous
    stats = sync_weights(sender if rank == 0 else None, export_hf_tensors(model, groups), weight_version="step-12")

`named_tensors` is any iterator of `(hf_name, full_tensor)`; it is consumed lazily and packed into
buckets of at most `bucket_bytes`. Each bucket's metadata (`names`, `dtypes`, `shapes`) is POSTed
to `/update_weights_from_distributed` of every server while trainer rank 0 broadcasts the bucket
over the weight-update group (gloo on CPU, NCCL on GPU), either as one flattened uint8 tensor
(`load_format="flattened_bucket"`, the default on NCCL) or one broadcast per tensor (the default
on gloo; see `WeightSyncConfig.load_format`). Packing the next
bucket overlaps the transfer of the current one. The in-process embedded engine is updated
directly by `LocalWeightSender` with the same bucketing.

With `verify_checksums`, each server reports the sha256 of every tensor it received (megafork
extension `return_checksums`), and a mismatch with the trainer's bytes raises `RolloutError`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megafork.rollout.buckets import BucketPacker, PackedBucket, dtype_name, iter_buckets, tensor_checksum
from megafork.rollout.httpjson import check_ok, get_info, request_json, succeeded
from megafork.rollout.process_group import destroy_weight_update_group, init_weight_update_group
from megafork.rollout.protocol import DEFAULT_GROUP, GROUP_ABSENT
from megafork.rollout.types import RolloutError

log = logging.getLogger(__name__)


@dataclass
class WeightSyncConfig:
    """How weights travel from the trainer to the rollout engines.

    Attributes:
        bucket_bytes: bucket capacity (default 512 MiB); a larger tensor travels alone.
        load_format: "flattened_bucket" (one uint8 broadcast per bucket), "per_tensor" (one
            broadcast per tensor, metadata still posted per bucket) or "auto": flattened buckets
            on NCCL, where per-collective overhead dominates and device copies are cheap;
            per-tensor on gloo, where the server receives straight into its weights and
            packing/unpacking would cost two host memcpys of the model.
        backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl".
        group_name: name of the weight-update group on both sides.
        master_address: address the engines use to reach trainer rank 0.
        master_port: TCP port for the rendezvous; 0 picks a free one.
        verify_checksums: compare per-tensor sha256 reported by the engine; mismatch is an error.
        timeout_s: HTTP, rendezvous and broadcast timeout.
    """

    bucket_bytes: int = 512 << 20
    load_format: str = "auto"
    backend: str = "auto"
    group_name: str = DEFAULT_GROUP
    master_address: str = "127.0.0.1"
    master_port: int = 0
    verify_checksums: bool = False
    timeout_s: float = 600.0

    def __post_init__(self):
        if not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1:
            raise ValueError(f"weight_sync.bucket_bytes: expected a positive int, found {self.bucket_bytes!r}")
        if self.load_format not in ("auto", "flattened_bucket", "per_tensor"):
            raise ValueError(f"weight_sync.load_format: expected 'auto', 'flattened_bucket' or 'per_tensor', "
                             f"found {self.load_format!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"weight_sync.backend: expected 'auto', 'gloo' or 'nccl', found {self.backend!r}")
        if not (0 <= self.master_port < 65536):
            raise ValueError(f"weight_sync.master_port: expected 0 (any) or a TCP port, found {self.master_port!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"weight_sync.timeout_s: expected > 0, found {self.timeout_s!r}")

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.backend

    def resolved_load_format(self) -> str:
        if self.load_format == "auto":
            return "flattened_bucket" if self.resolved_backend() == "nccl" else "per_tensor"
        return self.load_format


@dataclass
class SyncStats:
    """What one sync moved."""

    num_tensors: int = 0
    num_buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"num_tensors": self.num_tensors, "num_buckets": self.num_buckets, "bytes": self.bytes,
                "seconds": self.seconds, "gb_per_s": self.gb_per_s}

    def log(self, target: str) -> None:
        log.info("weight sync -> %s: %d tensors in %d buckets, %.1f MiB in %.3f s = %.2f GB/s", target,
                 self.num_tensors, self.num_buckets, self.bytes / 2**20, self.seconds, self.gb_per_s)


class HttpWeightSender:
    """Trainer rank 0's side of `/update_weights_from_distributed` to one or more servers.

    Args:
        urls: base URLs of SGLang (or `megafork serve`) servers.
        config: bucket size, backend, verification, timeouts.
        engine_ranks: ranks each server contributes to the group (its TP size). Default: read
            `tp_size` from each server's `/server_info`.

    Every `send` runs inside SGLang's weight-update session on each server
    (`/begin_weight_update` ... `/end_weight_update`, closed on failure too); SGLang 0.5.23
    refuses `/update_weights_from_distributed` outside one. A server that answers 404 on
    `/begin_weight_update` predates sessions; it is updated without one, and that is logged once.
    """

    def __init__(self, urls: list[str], config: WeightSyncConfig | None = None, engine_ranks: list[int] | None = None):
        if not urls:
            raise ValueError("urls: at least one server URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.config = config or WeightSyncConfig()
        self.engine_ranks = engine_ranks
        self.pg: dist.ProcessGroup | None = None
        self.device = torch.device("cpu")
        self._packer: BucketPacker | None = None  # its two buffers are kept between syncs
        self._http = ThreadPoolExecutor(max_workers=max(2, len(self.urls)), thread_name_prefix="wsync-http")
        self._wire = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsync-wire")
        self._sessionless: set[str] = set()  # servers that answered 404 on /begin_weight_update

    def connect(self) -> None:
        """Create the weight-update group: trainer rank 0 plus every server's ranks."""
        cfg = self.config
        need_info = cfg.verify_checksums or self.engine_ranks is None
        infos = [get_info(url, "server_info", cfg.timeout_s) for url in self.urls] if need_info else []
        if cfg.verify_checksums:
            # Probe before anything is sent: SGLang silently drops `return_checksums`, which
            # would only show after the first bucket had been loaded.
            lacking = [u for u, i in zip(self.urls, infos) if "return_checksums" not in i.get("megafork_extensions", [])]
            if lacking:
                raise RolloutError(f"{lacking}: verify_checksums (rollout.weight_sync_checksum) needs the megafork "
                                   "extension return_checksums, which these servers do not report in /server_info "
                                   "(only megafork serve implements it); turn verification off for SGLang servers")
        if self.engine_ranks is None:
            self.engine_ranks = [int(i.get("tp_size", 1)) for i in infos]
        world = 1 + sum(self.engine_ranks)
        self._destroy_stale_groups()
        port = cfg.master_port or _free_port()
        backend = cfg.resolved_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        local = self._wire.submit(init_weight_update_group, cfg.master_address, port, 0, world, cfg.group_name,
                                  backend, cfg.timeout_s)
        offsets = [1 + sum(self.engine_ranks[:i]) for i in range(len(self.urls))]
        posts = {url: self._http.submit(request_json, url, "/init_weights_update_group", {
            "master_address": cfg.master_address, "master_port": port, "rank_offset": off, "world_size": world,
            "group_name": cfg.group_name, "backend": backend}, cfg.timeout_s) for url, off in zip(self.urls, offsets)}
        self._wait_all(posts, "/init_weights_update_group", guard=local)
        self.pg = local.result(timeout=cfg.timeout_s)
        log.info("weight-update group %r ready: trainer + %s engine ranks via %s on %s:%d", cfg.group_name,
                 self.engine_ranks, backend, cfg.master_address, port)

    def _destroy_stale_groups(self) -> None:
        """Destroy a group of this sender's name left open on a server (by a trainer that was killed
        before `close`), so that `/init_weights_update_group` does not get a 400; a weight-update
        session that trainer left open (killed mid-sync) is ended too, or `/begin_weight_update`
        would be refused.

        SGLang 0.5.23 answers 400 `{"success": false, "message": "The group to be destroyed does not
        exist."}` when there is none (`WeightUpdater.destroy_weights_update_group`), which is the
        normal case; a server without the endpoint (404) is left to the init to judge.
        """
        path, name = "/destroy_weights_update_group", self.config.group_name
        posts = {u: self._http.submit(request_json, u, path, {"group_name": name}, self.config.timeout_s)
                 for u in self.urls}
        for url, fut in posts.items():
            status, payload = fut.result()
            message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
            if succeeded(status, payload):
                status, answer = request_json(url, "/end_weight_update", {}, self.config.timeout_s)
                ended = succeeded(status, answer)
                log.warning("%s had a weight-update group %r open (left by an earlier trainer that did not close "
                            "it, e.g. one that was killed); destroyed it%s before creating this run's", url, name,
                            " and ended the weight-update session it had left open" if ended else "")
            elif not (status == 404 or (status == 400 and GROUP_ABSENT in message)):
                check_ok(url, path, status, payload)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> SyncStats:
        """Stream every tensor to every server; returns (and logs) bytes, seconds, GB/s.

        Args:
            named_tensors: (hf_name, full tensor) pairs, consumed lazily.
            weight_version: reported by the servers afterwards (sent with every bucket).
        """
        if self.pg is None:
            raise RolloutError(f"{self.urls}: call connect() before send()")
        opened = self._begin_session()
        try:
            stats = self._send_buckets(named_tensors, weight_version)
        except BaseException:
            # A bucket may still be on the wire (the failure came from the export); let it finish first.
            self._wire.submit(lambda: None).result(timeout=self.config.timeout_s)
            self._end_session(opened, raising=False)
            raise
        self._end_session(opened, raising=True)
        stats.log(",".join(self.urls))
        return stats

    def _begin_session(self) -> list[str]:
        """`/begin_weight_update` on every server; returns those that opened a session."""
        path = "/begin_weight_update"
        posts = {u: self._http.submit(request_json, u, path, {"selector": "all"}, self.config.timeout_s)
                 for u in self.urls}
        opened, failure = [], None
        for url, fut in posts.items():
            try:
                status, payload = fut.result()
            except RolloutError as exc:
                failure = failure or exc
                continue
            if status == 404:
                if url not in self._sessionless:
                    self._sessionless.add(url)
                    log.warning("%s answers 404 on %s: a server from before weight-update sessions; updating it "
                                "without one", url, path)
                continue
            try:
                check_ok(url, path, status, payload)
                opened.append(url)
            except RolloutError as exc:
                failure = failure or exc
        if failure is not None:
            self._end_session(opened, raising=False)
            raise failure
        return opened

    def _end_session(self, urls: list[str], raising: bool) -> None:
        """`/end_weight_update` on `urls`; on a failure path only logged (the first error wins)."""
        path = "/end_weight_update"
        posts = {u: self._http.submit(request_json, u, path, {}, self.config.timeout_s) for u in urls}
        for url, fut in posts.items():
            try:
                check_ok(url, path, *fut.result())
            except RolloutError as exc:
                if raising:
                    raise
                log.warning("could not close the weight-update session on %s: %s", url, exc)

    def _send_buckets(self, named_tensors, weight_version) -> SyncStats:
        t0 = time.perf_counter()
        stats = SyncStats()
        in_flight: Future | None = None
        if self.config.resolved_load_format() == "flattened_bucket":
            if self._packer is None or self._packer.device != self.device:
                self._packer = BucketPacker(self.config.bucket_bytes, self.device)
            buckets = self._packer.packed(named_tensors)  # packed as they arrive, into reused buffers
        else:
            buckets = iter_buckets(named_tensors, self.config.bucket_bytes)
        for bucket in buckets:
            if isinstance(bucket, PackedBucket):
                names, dtypes, shapes = bucket.names, bucket.dtypes, bucket.shapes
                payload, meta_extra, tensors = [bucket.flat], {"load_format": "flattened_bucket"}, bucket.tensors()
            else:
                names, dtypes, shapes = [n for n, _ in bucket], [t.dtype for _, t in bucket], [t.shape for _, t in bucket]
                payload, meta_extra, tensors = [t.detach().to(self.device).contiguous() for _, t in bucket], {}, bucket
            body = {"names": names, "dtypes": [dtype_name(d) for d in dtypes], "shapes": [list(s) for s in shapes],
                    "group_name": self.config.group_name, "weight_version": weight_version, **meta_extra}
            expected = None
            if self.config.verify_checksums:
                body["return_checksums"] = True
                expected = {n: tensor_checksum(t) for n, t in tensors}
            del tensors, bucket  # nothing of a packed bucket outlives its copy into the buffer
            if in_flight is not None:
                in_flight.result()
            in_flight = self._wire.submit(self._transmit, body, payload, expected)
            stats.num_tensors += len(names)
            stats.num_buckets += 1
            stats.bytes += sum(p.numel() * p.element_size() for p in payload)
        if in_flight is not None:
            in_flight.result()
        stats.seconds = time.perf_counter() - t0
        return stats

    def _transmit(self, body: dict, payload: list[torch.Tensor], expected: dict | None) -> None:
        path = "/update_weights_from_distributed"
        posts = {url: self._http.submit(request_json, url, path, body, self.config.timeout_s) for url in self.urls}
        works = [dist.broadcast(t, group_src=0, group=self.pg, async_op=True) for t in payload]
        answers = self._wait_all(posts, path, guard=works)
        for url, answer in answers.items():
            if expected is None:
                continue
            got = answer.get("checksums") if isinstance(answer, dict) else None
            if got is None:
                raise RolloutError(f"{url}{path}: verify_checksums is on but the server returned no 'checksums' "
                                   "(only megafork serve implements return_checksums)")
            bad = sorted(n for n in expected if got.get(n) != expected[n])
            if bad:
                raise RolloutError(f"{url}{path}: checksum mismatch for {len(bad)} of {len(expected)} tensors: {bad[:5]}")

    def _wait_all(self, posts: dict[str, Future], path: str, guard) -> dict[str, object]:
        """Wait for the HTTP answers and the local collective(s); fail fast if a server refuses.

        A server that answers with an error never joins the collective, so waiting on the
        collective first would block until the group timeout.
        """
        deadline = time.monotonic() + self.config.timeout_s
        answers = {}
        local = [guard] if isinstance(guard, Future) else list(guard)
        local_done = lambda: all(w.done() if isinstance(w, Future) else w.is_completed() for w in local)  # noqa: E731
        while posts:
            done, _ = wait_futures(list(posts.values()), timeout=0.005, return_when=FIRST_COMPLETED)
            for url in [u for u, f in posts.items() if f in done]:
                answers[url] = check_ok(url, path, *posts.pop(url).result())
            if posts and local_done():
                for w in local:  # our side failed (e.g. the rendezvous): the servers would wait forever
                    if isinstance(w, Future) and w.exception() is not None:
                        raise w.exception()
                # Our side finished; the servers are loading. Block on their answers.
                for url, f in list(posts.items()):
                    answers[url] = check_ok(url, path, *f.result(timeout=max(1.0, deadline - time.monotonic())))
                posts.clear()
            if time.monotonic() > deadline:
                raise RolloutError(f"{list(posts)} {path}: no answer within {self.config.timeout_s:g}s")
        for w in local:
            w.result(timeout=max(1.0, deadline - time.monotonic())) if isinstance(w, Future) else w.wait()
        return answers

    def close(self) -> None:
        """Destroy the group on the servers and here (best effort on the servers)."""
        if self.pg is not None:
            for url in self.urls:
                try:
                    request_json(url, "/destroy_weights_update_group", {"group_name": self.config.group_name},
                                 timeout_s=30)
                except RolloutError as exc:
                    log.warning("could not destroy the weight-update group on %s: %s", url, exc)
            destroy_weight_update_group(self.pg)
            self.pg = None
        self._packer = None
        self._http.shutdown(wait=False)
        self._wire.shutdown(wait=False)


class LocalWeightSender:
    """Update an in-process `EmbeddedEngine` directly, bucket by bucket (no packing, no network).

    Args:
        engine: the embedded engine.
        config: `bucket_bytes` and `verify_checksums` apply.
    """

    def __init__(self, engine, config: WeightSyncConfig | None = None):
        self.engine = engine
        self.config = config or WeightSyncConfig()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None) -> SyncStats:
        t0 = time.perf_counter()
        stats = SyncStats()
        for bucket in iter_buckets(named_tensors, self.config.bucket_bytes):
            self.engine.update_weights(bucket, weight_version=weight_version)
            if self.config.verify_checksums:
                got = self.engine.weights_checksum([n for n, _ in bucket])
                bad = [n for n, t in bucket if got[n] != tensor_checksum(t.detach().to(self.engine.dtype))]
                if bad:
                    raise RolloutError(f"embedded engine: checksum mismatch after loading {bad[:5]}")
            stats.num_tensors += len(bucket)
            stats.num_buckets += 1
            stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        stats.seconds = time.perf_counter() - t0
        stats.log("embedded engine")
        return stats


def sync_weights(sender, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 weight_version: str | None = None) -> SyncStats | None:
    """Run on every trainer rank: the rank holding `sender` sends, the others only drain the iterator.

    The export iterator gathers TP shards collectively, so every rank must walk it to the end.

    Args:
        sender: `HttpWeightSender`/`LocalWeightSender` on the sending rank, None elsewhere.
        named_tensors: the export iterator.
        weight_version: passed to the engines.
    """
    named_tensors = iter(named_tensors)
    if sender is None:
        for _ in named_tensors:
            pass
        return None
    try:
        return sender.send(named_tensors, weight_version=weight_version)
    except BaseException:
        # The other ranks are inside the export's TP gathers / PP sends: finish walking it so
        # they complete, then fail, instead of leaving them in a collective until the timeout.
        for _ in named_tensors:
            pass
        raise


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]

"""The `rollout` config section: the generation engine (embedded or SGLang), sampling, weight sync,
and the SGLang servers rank 0 may launch itself. Loaded through `megafork.train.config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megafork.rollout.deploy import check_master_addr
from megafork.train.config_types import _check_types, _positive, _require


@dataclass
class RolloutConfig:
    """Response generation.

    Attributes:
        engine: "embedded" (transformers, in the trainer's processes) or "sglang" (HTTP servers).
        sglang_urls: base URLs of SGLang servers (required when engine is "sglang").
        temperature: sampling temperature (the paper samples at 1.0; entropies are at this T).
        top_p: nucleus threshold.
        top_k: top-k cut (-1 = off).
        max_response_len: response token cap (paper: 20,480).
        batch_size: prompts per generate call of the embedded engine.
        weight_sync_bucket_mb: bucket size for weight sync to the engine.
        weight_sync_checksum: verify a checksum of every synced bucket.
        max_inflight_per_server: open `/generate` requests per SGLang server (one per prompt group).
        request_timeout_s: timeout of one `/generate` request; it is then retried on another server.
        request_retries: extra attempts per request after a timeout or a 5xx.
        step_timeout_minutes: how long the other ranks wait (on gloo, not NCCL) for rank 0's rollout.
        weight_sync_master_addr: the address SGLang servers use to reach trainer rank 0 for weight
            sync ("" = detected: the local address that routes to the first server).
        weight_sync_port: TCP port of the weight-update rendezvous on rank 0 (0 = a free one).
        weight_sync_timeout_s: timeout of the weight-update rendezvous, broadcasts and HTTP calls.
        sglang_launch: rank 0 starts the SGLang servers itself (`python -m sglang.launch_server`)
            on its node, from `model.hf_path`; `sglang_urls` must then be empty.
        sglang_launch_servers: servers to launch.
        sglang_launch_tp: GPUs (tensor parallelism) per launched server.
        sglang_launch_base_gpu_id: first GPU of the launched servers; they must not overlap the
            trainer's GPUs on that node (0 .. LOCAL_WORLD_SIZE - 1).
        sglang_launch_base_port: server i listens on base_port + i.
        sglang_launch_args: extra `sglang.launch_server` flags.
    """

    engine: Literal["embedded", "sglang"] = "embedded"
    sglang_urls: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 20480
    batch_size: int = 64
    weight_sync_bucket_mb: int = 512
    weight_sync_checksum: bool = False
    max_inflight_per_server: int = 64
    request_timeout_s: float = 3600.0
    request_retries: int = 2
    step_timeout_minutes: float = 480.0
    weight_sync_master_addr: str = ""
    weight_sync_port: int = 0
    weight_sync_timeout_s: float = 600.0
    sglang_launch: bool = False
    sglang_launch_servers: int = 1
    sglang_launch_tp: int = 1
    sglang_launch_base_gpu_id: int = 0
    sglang_launch_base_port: int = 30000
    sglang_launch_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check_types(self, "rollout")
        _positive(self, "rollout", "temperature", "max_response_len", "batch_size", "weight_sync_bucket_mb",
                  "max_inflight_per_server", "request_timeout_s", "step_timeout_minutes", "weight_sync_timeout_s",
                  "sglang_launch_servers", "sglang_launch_tp")
        _positive(self, "rollout", "request_retries", "sglang_launch_base_gpu_id", allow_zero=True)
        _require(0 <= self.weight_sync_port < 65536, "rollout.weight_sync_port", "0 (any free port) or a TCP port",
                 self.weight_sync_port)
        _require(0 < self.sglang_launch_base_port < 65536, "rollout.sglang_launch_base_port", "a TCP port",
                 self.sglang_launch_base_port)
        if self.weight_sync_master_addr:
            check_master_addr(self.weight_sync_master_addr, "rollout.weight_sync_master_addr")
        if self.sglang_launch:
            _require(self.engine == "sglang", "rollout.engine", "'sglang' when rollout.sglang_launch=true", self.engine)
            _require(not self.sglang_urls, "rollout.sglang_urls",
                     "no URLs when rollout.sglang_launch=true (the launched servers' URLs are used)", self.sglang_urls)
        _require(0.0 < self.top_p <= 1.0, "rollout.top_p", "a float in (0, 1]", self.top_p)
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", "-1 or an integer >= 1", self.top_k)
        if self.engine == "sglang" and not self.sglang_launch:
            _require(bool(self.sglang_urls), "rollout.sglang_urls", "at least one URL when rollout.engine='sglang'",
                     self.sglang_urls)
        for i, url in enumerate(self.sglang_urls):
            _require(url.startswith(("http://", "https://")), f"rollout.sglang_urls[{i}]", "an http(s):// URL", url)

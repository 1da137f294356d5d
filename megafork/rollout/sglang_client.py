"""Rollout through SGLang servers (or `megafork serve`) over HTTP. Never imports `sglang`.

    engine = SGLangEngine(["http://10.0.0.5:30000", "http://10.0.0.6:30000"])
    samples = engine.generate(prompt_ids, SamplingParams(n=16, temperature=1.0, max_new_tokens=20480))

    # or start the servers from config (GPU machine with sglang installed):
    engine = SGLangEngine.launch(SGLangLaunchConfig(model_path="Qwen/Qwen3-8B", num_servers=2, tp_size=4))

`generate` streams: one `/generate` request per prompt group, at most `max_inflight_per_server`
open per server, each reply parsed into int32/float32 arrays as it arrives, failed requests
retried on another server, dead servers dropped for the step (`megafork.rollout.stream`). With a
seed, every sample is sent as its own entry with its own `sampling_seed`
(`sample_seed(seed, prompt, sample, n)`, see `generate_body`), so the n responses of a group differ
and the seeds do not depend on the number of servers or on timing. SGLang honours seeds only
under `--enable-deterministic-inference`; `megafork serve` always does.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from megafork.rollout.httpjson import check_ok, request_json
from megafork.rollout.stream import GroupResult, StreamConfig, StreamingClient, StreamResult, generate_body  # noqa: F401 (re-exported)
from megafork.rollout.types import RolloutError, Sample, SamplingParams, validate_prompts
from megafork.rollout.weight_sync import HttpWeightSender, WeightSyncConfig

log = logging.getLogger(__name__)


@dataclass
class SGLangLaunchConfig:
    """Start `python -m sglang.launch_server` processes (one per server) on this machine.

    Attributes:
        model_path: HF model directory or hub id (`--model-path`).
        num_servers: servers to start; server i uses GPUs [base_gpu_id + i*tp_size, ...).
        tp_size: tensor parallelism per server (`--tp-size`).
        host: bind address (`--host`).
        base_port: server i listens on base_port + i (`--port`).
        base_gpu_id: first GPU of server 0 (`--base-gpu-id`).
        extra_args: more `sglang.launch_server` flags, e.g. ["--mem-fraction-static", "0.7"].
        python: interpreter that has sglang installed.
        startup_timeout_s: how long to wait for `/health`.
    """

    model_path: str
    num_servers: int = 1
    tp_size: int = 1
    host: str = "127.0.0.1"
    base_port: int = 30000
    base_gpu_id: int = 0
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    startup_timeout_s: float = 900.0

    def __post_init__(self):
        for name in ("num_servers", "tp_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"sglang.{name}: expected an integer >= 1, found {getattr(self, name)!r}")

    def commands(self) -> list[list[str]]:
        """The launch command of every server (SGLang 0.5 CLI flags)."""
        return [[self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
                 "--tp-size", str(self.tp_size), "--host", self.host, "--port", str(self.base_port + i),
                 "--base-gpu-id", str(self.base_gpu_id + i * self.tp_size), *self.extra_args]
                for i in range(self.num_servers)]

    def urls(self) -> list[str]:
        return [f"http://{self.host}:{self.base_port + i}" for i in range(self.num_servers)]


def launch_servers(commands: list[list[str]], urls: list[str], timeout_s: float) -> list[subprocess.Popen]:
    """Start server processes and wait until each answers `/health` (kills them all on failure).

    Args:
        commands: one argv per server.
        urls: the base URL each will answer on.
        timeout_s: startup deadline for all of them.
    """
    procs = [subprocess.Popen(cmd) for cmd in commands]
    deadline = time.monotonic() + timeout_s
    try:
        for url, proc, cmd in zip(urls, procs, commands):
            while True:
                if proc.poll() is not None:
                    raise RolloutError(f"{url}: server exited with code {proc.returncode} during startup: {' '.join(cmd)}")
                try:
                    status, _ = request_json(url, "/health", timeout_s=5)
                    if status == 200:
                        break
                except RolloutError:
                    pass
                if time.monotonic() > deadline:
                    raise RolloutError(f"{url}: not healthy after {timeout_s:g}s: {' '.join(cmd)}")
                time.sleep(0.5)
    except BaseException:
        stop_servers(procs)
        raise
    return procs


def stop_servers(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate, then kill, server processes started by `launch_servers`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class SGLangEngine:
    """`RolloutEngine` over SGLang's HTTP protocol, streaming one request per prompt group.

    Args:
        urls: server base URLs.
        timeout_s: per-request timeout (`rollout.request_timeout_s`; a long generation needs a long one).
        retries: extra attempts per request after a timeout or 5xx (`rollout.request_retries`).
        weight_sync: configuration for `update_weights` (connects on first use).
        procs: server processes this engine owns (stopped by `close()`).
        max_inflight_per_server: open requests per server (`rollout.max_inflight_per_server`).
        progress: show a progress bar while generating (samples done / total, tokens/s).
    """

    def __init__(self, urls: list[str], timeout_s: float = 3600.0, retries: int = 2,
                 weight_sync: WeightSyncConfig | None = None, procs: list[subprocess.Popen] | None = None,
                 max_inflight_per_server: int = 64, progress: bool = False):
        if not urls:
            raise ValueError("urls: at least one server URL is needed")
        self.stream_config = StreamConfig(max_inflight_per_server=max_inflight_per_server, request_timeout_s=timeout_s,
                                          retries=retries, progress=progress)
        self.client = StreamingClient(urls, self.stream_config)
        self.urls = self.client.urls
        self.timeout_s = timeout_s
        self.retries = retries
        self.weight_sync_config = weight_sync or WeightSyncConfig()
        self.procs = procs or []
        self._sender: HttpWeightSender | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="sglang-client")

    @classmethod
    def launch(cls, config: SGLangLaunchConfig, **kwargs) -> SGLangEngine:
        """Start SGLang servers from `config` and connect to them."""
        procs = launch_servers(config.commands(), config.urls(), config.startup_timeout_s)
        return cls(config.urls(), procs=procs, **kwargs)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Sample]:
        """Samples for every prompt, prompt-major; ids/log-probs are int32/float32 numpy arrays."""
        result = self.generate_groups(prompts, sampling)
        return [s for g in result.groups for s in g.samples()]

    def generate_groups(self, prompts: list[list[int]], sampling: SamplingParams,
                        on_group: Callable[[GroupResult], bool] | None = None) -> StreamResult:
        """Stream every prompt's group; `on_group` sees each as it completes and may stop the call
        early by returning True (the open requests are then aborted). See `StreamingClient.run`."""
        return self.client.run(validate_prompts(prompts), sampling, on_group)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       weight_version: str | None = None) -> dict:
        """Broadcast HF-named tensors into every server (call on trainer rank 0 only)."""
        if self._sender is None:
            self._sender = HttpWeightSender(self.urls, self.weight_sync_config)
            self._sender.connect()
        return self._sender.send(named_tensors, weight_version=weight_version).as_dict()

    def _post_all(self, path: str, body: dict) -> None:
        for f, url in [(self._pool.submit(request_json, u, path, body, self.timeout_s, self.retries), u)
                       for u in self.urls]:
            check_ok(url, path, *f.result())

    def pause(self, mode: str = "abort") -> None:
        self._post_all("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self._post_all("/continue_generation", {})

    def health(self) -> bool:
        for url in self.urls:
            try:
                status, _ = request_json(url, "/health", timeout_s=min(self.timeout_s, 30.0))
            except RolloutError:
                return False
            if status != 200:
                return False
        return True

    def close(self) -> None:
        """Drop the weight-update group and stop servers this engine launched."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        stop_servers(self.procs)
        self._pool.shutdown(wait=False)

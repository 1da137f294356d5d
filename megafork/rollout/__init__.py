"""Rollout engines and weight sync.

- `RolloutEngine`, `SamplingParams`, `Sample`: the interface (`types.py`).
- `EmbeddedEngine`: transformers Qwen3 in process, batched KV-cache generation (`embedded.py`).
- `SGLangEngine`: HTTP client for SGLang servers or `megafork serve` (`sglang_client.py`).
- `megafork serve`: the SGLang-protocol server around the embedded engine (`server.py`).
- `HttpWeightSender`, `LocalWeightSender`, `sync_weights`: trainer -> engine weight sync (`weight_sync.py`).
- `rollout_logprob_drift`: mean |rollout - trainer| log-prob (`drift.py`).
"""
from megafork.rollout.drift import rollout_logprob_drift
from megafork.rollout.embedded import EmbeddedEngine, WeightUpdateError
from megafork.rollout.sglang_client import SGLangEngine, SGLangLaunchConfig, launch_servers, stop_servers
from megafork.rollout.types import RolloutEngine, RolloutError, Sample, SamplingParams
from megafork.rollout.weight_sync import (
    HttpWeightSender,
    LocalWeightSender,
    SyncStats,
    WeightSyncConfig,
    sync_weights,
)

__all__ = [
    "EmbeddedEngine", "HttpWeightSender", "LocalWeightSender", "RolloutEngine", "RolloutError", "SGLangEngine",
    "SGLangLaunchConfig", "Sample", "SamplingParams", "SyncStats", "WeightSyncConfig", "WeightUpdateError",
    "launch_servers", "rollout_logprob_drift", "stop_servers", "sync_weights",
]

"""Give the rollout engine this run's weights before the first rollout.

An external engine (SGLang, `megafork serve`) outlives the runs that use it: after one run it
serves that run's final weights, so a fresh run that trusted it to hold `model.hf_path` would
sample its first steps (and its initial evaluation) from someone else's policy. Every run with an
external engine therefore syncs at start; the embedded engine, built from `model.hf_path` inside
this process, needs it only when the run starts from other weights (a resume or
`model.megatron_path`).

Before the sync, rank 0 asks each server what it serves and warns if that is not what this run
trains: by checksum where the server offers `/get_weights_checksum` (`megafork serve`), by
`weight_version` otherwise (SGLang). After the sync the checksums must match, or the run stops.
"""
from __future__ import annotations

import logging

from megafork.rollout import RolloutError, sync_weights
from megafork.rollout.served_weights import INITIAL_VERSION, ChecksumTap, served_weights

log = logging.getLogger(__name__)


def sync_engine_at_start(run, start: int) -> None:
    """Sync the engine to the weights step `start` trains on (every rank calls this).

    Args:
        run: the `Run` (its `sender` is set on rank 0 only).
        start: the first step of this run (0 for a fresh run, the checkpoint's step on resume).
    """
    from megafork.models.qwen3 import export_hf_tensors

    cfg = run.cfg
    external = cfg.rollout.engine != "embedded"
    if not (external or start > 0 or cfg.model.megatron_path):
        return  # the embedded engine was built from model.hf_path, the weights this run starts from
    version = str(start)  # the loop's syncs after step s send str(s + 1)
    urls = list(getattr(run.sender, "urls", [])) if external else []
    before = [served_weights(u) for u in urls]
    with_sums = [b for b in before if b.checksums is not None]
    tap = ChecksumTap(with_sums[0].dtype) if with_sums else None
    stream = export_hf_tensors(run.unwrapped, run.groups)
    sync_weights(run.sender, tap.wrap(stream) if tap else stream, weight_version=version)
    if not urls:
        return
    fresh = start == 0 and not cfg.model.megatron_path
    for b in before:
        _warn_if_stale(b, tap, version, fresh)
    for b in with_sums:
        if b.dtype != tap.dtype:  # servers in another dtype: compare them by version only
            continue
        after = served_weights(b.url)
        bad = after.differs_from(tap.sums)
        if bad:
            raise RolloutError(f"{b.url}: after the start-of-run weight sync it still serves other weights in "
                               f"{len(bad)} of {len(tap.sums)} tensors (e.g. {bad[:3]}); expected exactly the "
                               f"weights of step {start}")
    log.info("rollout engine(s) %s synced to this run's weights (weight_version %r) before the first rollout",
             ",".join(urls), version)


def _warn_if_stale(before, tap: ChecksumTap | None, version: str, fresh: bool) -> None:
    """Warn when a server held weights other than this run's starting ones before the sync."""
    if before.checksums is not None and tap is not None and before.dtype == tap.dtype:
        bad = before.differs_from(tap.sums)
        if bad:
            log.warning("rollout engine %s served other weights than this run starts from (weight_version %r; "
                        "%d of %d tensors differ, e.g. %s), likely left by an earlier run; synced this run's "
                        "weights (weight_version %r) before the first rollout", before.url, before.version,
                        len(bad), len(tap.sums), bad[:3], version)
        return
    expected = INITIAL_VERSION if fresh else version
    if before.version != expected:
        log.warning("rollout engine %s served weight_version %r, expected %r for this run's starting weights "
                    "(likely left by an earlier run); synced this run's weights (weight_version %r) before the "
                    "first rollout", before.url, before.version, expected, version)

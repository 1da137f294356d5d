"""Atomic, resumable training checkpoints through megatron-core `dist_checkpointing`.

    root = checkpoints_root(cfg.log.run_dir)                       # runs/<name>/checkpoints
    path = resolve_resume(cfg.train.resume, root)                  # None = start fresh
    if path is not None:
        loaded = load_checkpoint(path, [ddp], optimizer, scheduler, groups)
        start_step, sampler_state = loaded.step, loaded.extra["data"]
    ...
    save_checkpoint(root, step, [ddp], optimizer, scheduler, groups,
                    extra={"data": sampler.state_dict()}, keep_last=3)

Public API:
    resume(cfg, run, run_dir) -> (steps_completed, extra)        the loop's call (restores run.sampler too)
    save(run, run_dir, step, extra=None, keep_last=None) -> Path  the loop's call (adds run.sampler state)
    checkpoints_root(run_dir) -> Path
    save_checkpoint(root, step, model_chunks, optimizer, scheduler, groups, extra=None, rank_extra=None,
                    keep_last=3) -> Path                          (call on every rank)
    load_checkpoint(path, model_chunks, optimizer, scheduler, groups, load_optimizer=True) -> LoadedCheckpoint
    resolve_resume(resume, root) -> Path | None                   ("auto" | "none" | a path)
    latest_checkpoint(root) -> Path | None
    list_checkpoints(root) -> list[Path]                          (complete ones, by step)
    validate_checkpoint(path) -> dict                             (the meta; raises CheckpointError)
    locate_damage(path) -> str                                    (after a failed load: which file)
    sync_save_strategy(thread_count=2)                            (for any synchronous dist_checkpointing.save)
    capture_rng_state() -> dict, restore_rng_state(state) -> None
    CheckpointError(ValueError), LoadedCheckpoint(path, step, extra, rank_extra, meta)

Layout of `root`:
    step_0000020/                 one complete checkpoint (dist_checkpointing files, see below)
    step_0000040/
    latest                        text file holding the name of the newest complete checkpoint
    step_0000060.tmp-<nonce>/     a save in progress (or killed); ignored, removed by the next save

A checkpoint directory holds what `dist_checkpointing.save` writes (torch_dist format:
`__<rank>_<i>.distcp`, `.metadata`, `common.pt`, `metadata.json`) for this sharded state dict:
    "model" (or "model0", "model1", ... with virtual pipeline chunks): `chunk.module.sharded_state_dict()`,
        i.e. the plain GPTModel keys, the same keys `megafork.models.qwen3.checkpoint` writes;
    "optimizer": `optimizer.sharded_state_dict(model_sd)` (Adam moments, fp32 main params, step);
    "scheduler": `scheduler.state_dict()`;
    "extra": `pickle.dumps(extra)` - the loop's state (saved once, by rank 0; must agree on all ranks);
    "rank_state": a `ShardedObject` keyed by global rank: the pickled RNG states of this rank
        (python `random`, numpy, torch CPU, torch CUDA + megatron's CUDA RNG tracker when present)
        and `rank_extra`.
and last `megafork_checkpoint.json` (step, layout, versions), whose presence marks it complete.
Pickled bytes keep `torch.load(weights_only=True)` (megatron's common-state loader) working for
any picklable value; checkpoints are trusted input, like any torch checkpoint.

`root` must be on a filesystem all ranks share (as dist_checkpointing itself requires).
Atomicity: every rank writes into `step_N.tmp-<nonce>/` (nonce from rank 0) and fsyncs its files;
after a barrier rank 0 writes the meta file, fsyncs it and the directory, renames the directory to
`step_N/` and replaces `latest` by write-temp + fsync + `os.replace`. A process killed at any point
leaves either the previous `latest` or the new one pointing at a complete checkpoint. Old
checkpoints beyond `keep_last` are renamed to `*.deleting-<nonce>` before removal, so a kill during
pruning never leaves a half-deleted directory under a checkpoint name.

Bit-exact resume: model, optimizer and scheduler state are restored exactly, and every RNG of every
rank is restored last. RNG state of objects the loop owns (e.g. a `torch.Generator` of a rollout
engine) must travel in `extra`/`rank_extra`. The RNG states are restored only when the world size
and the TP/PP/CP/DP layout equal the saved ones (otherwise ranks do not correspond; a warning says so).

The atomic commit lives in `megafork.train.checkpoint_commit`, the megatron state dict pieces (and
`sync_save_strategy`) in `megafork.train.checkpoint_state`, naming and validation in
`megafork.train.checkpoint_layout`; this module re-exports their public names.
"""
from __future__ import annotations

import logging
import pickle
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Re-exported: together with this module they are the public checkpoint API.
from megafork.train.checkpoint_commit import (  # noqa: F401
    _barrier,
    _broadcast_str,
    _fsync_file,
    _publish,
    _raise_everywhere,
    _remove_stale,
    _world,
)
from megafork.train.checkpoint_layout import (  # noqa: F401
    FORMAT_VERSION,
    META_FILE,
    CheckpointError,
    capture_rng_state,
    checkpoints_root,
    latest_checkpoint,
    list_checkpoints,
    locate_damage,
    resolve_resume,
    restore_rng_state,
    step_dir_name,
    validate_checkpoint,
)
from megafork.train.checkpoint_state import (  # noqa: F401
    _OPTIMIZER_METADATA,
    _init_distributed_state,
    _is_distributed,
    _layout,
    _model_sharded_state,
    _optimizer_has_state,
    _rank_object,
    _restore_adam_steps,
    _schedule_changes,
    sync_save_strategy,
)
from megafork.train.storage import StorageError, storage_error  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the model/optimizer/scheduler it loaded in place.

    Attributes:
        path: the checkpoint directory.
        step: the step saved (the number of RL steps completed; resume at this step).
        extra: the loop's `extra` dict as saved.
        rank_extra: this rank's `rank_extra` (None if none was saved or the world size changed).
        meta: the contents of `megafork_checkpoint.json`.
    """

    path: Path
    step: int
    extra: dict
    rank_extra: object
    meta: dict = field(repr=False)


def save_checkpoint(root: str | Path, step: int, model_chunks: list, optimizer, scheduler, groups,
                    extra: dict | None = None, rank_extra: object = None, keep_last: int = 3,
                    thread_count: int = 2) -> Path:
    """Atomically save model, optimizer, scheduler, RNGs and the loop's state. Call on every rank.

    Args:
        root: the run's checkpoints directory (`checkpoints_root(run_dir)`); created if needed.
        step: RL steps completed (a resume continues with this step index).
        model_chunks: the DDP-wrapped chunks (`[ddp]`); unwrapped modules work too.
        optimizer: the megatron optimizer (None: model only).
        scheduler: the `OptimizerParamScheduler` (None: not saved).
        groups: `ParallelGroups`; its layout is recorded in the meta.
        extra: picklable dict of the loop's state (data sampler position, counters, ...). Saved
            once, by rank 0, so it must be equal on every rank (megatron warns when it is not).
        rank_extra: picklable per-rank state (e.g. a rank's own `torch.Generator` state).
        keep_last: keep this many newest checkpoints (0 = keep all; default 3: a 32B run's
            checkpoint with Adam state is ~0.4 TB); the new one always stays.
        thread_count: writer processes per rank (megatron's `FileSystemWriterAsync` buckets).

    Returns:
        The final `root/step_N` path.
    """
    from megatron.core import dist_checkpointing

    rng = capture_rng_state()  # first: nothing below may draw from an RNG before it is recorded
    rank, world = _world()
    root = Path(root)
    final = root / step_dir_name(step)
    nonce = _broadcast_str(uuid.uuid4().hex[:12] if rank == 0 else None)
    tmp = root / f"{final.name}.tmp-{nonce}"
    what = f"saving checkpoint step {step} into {tmp} (left in place; the next save removes it)"
    failure = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale(root, keep=set())
            tmp.mkdir()
        except OSError as exc:
            failure = storage_error(exc, root, what)
    _raise_everywhere(failure)

    state = _model_sharded_state(model_chunks)
    model_keys = sorted(state)
    has_opt_state = optimizer is not None and _optimizer_has_state(optimizer)
    if has_opt_state:
        # Megatron's optimizer only knows params through the model's sharded dict (all chunks).
        state["optimizer"] = optimizer.sharded_state_dict({k: state[k] for k in model_keys},
                                                           metadata=_OPTIMIZER_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["extra"] = pickle.dumps(extra or {})
    state["rank_state"] = _rank_object(rank, world, pickle.dumps({"rng": rng, "rank_extra": rank_extra}))
    t0 = time.perf_counter()
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sync_save_strategy(thread_count))
        for f in tmp.glob(f"__{rank}_*"):
            _fsync_file(f)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a full disk surfaces as anything
        raise storage_error(exc, root, what) from exc
    _barrier()

    if rank == 0:
        try:
            _publish(root, tmp, final, step, world, model_keys, has_opt_state, scheduler, groups, nonce, keep_last,
                     distributed=_is_distributed(optimizer))
            logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        except OSError as exc:
            failure = storage_error(exc, root, what)
    _raise_everywhere(failure)
    return final


# --------------------------------------------------------------------------------------------------
# Loading.

def load_checkpoint(path: str | Path, model_chunks: list, optimizer, scheduler, groups,
                    load_optimizer: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint into the model, optimizer and scheduler in place and restore every RNG.

    The model may use another TP/PP layout than the saver (dist_checkpointing reshards); the RNG
    states and `rank_extra` are then not restored (warning), so such a resume is not bit-exact.

    Args:
        path: a complete checkpoint directory (`resolve_resume`).
        model_chunks: the DDP-wrapped chunks, built exactly as for training.
        optimizer: the megatron optimizer (None, or `load_optimizer=False`: model only).
        scheduler: the `OptimizerParamScheduler` (None: not restored).
        groups: `ParallelGroups` of this rank.
        load_optimizer: restore the optimizer state.

    Returns:
        `LoadedCheckpoint` with the step, `extra` and this rank's `rank_extra`.

    Raises:
        CheckpointError: not a complete megafork checkpoint, different model chunking, a schedule that
            differs from this run's, or a model state that does not match.
    """
    from megatron.core import dist_checkpointing

    p = Path(path)
    meta = validate_checkpoint(p)
    rank, world = _world()
    state = _model_sharded_state(model_chunks)
    model_keys = sorted(state)
    if model_keys != meta["model_keys"]:
        raise CheckpointError(f"checkpoint {p}: expected model chunks {meta['model_keys']} (as saved), found "
                              f"{model_keys} in this run (virtual pipeline size differs)")
    want_opt = load_optimizer and optimizer is not None and meta["has_optimizer_state"]
    if want_opt and meta.get("distributed_optimizer", False) != _is_distributed(optimizer):
        raise CheckpointError(f"checkpoint {p}: its optimizer state was saved with optim.distributed_optimizer="
                              f"{str(meta.get('distributed_optimizer', False)).lower()}, this run has "
                              f"optim.distributed_optimizer={str(_is_distributed(optimizer)).lower()}; the two "
                              "optimizer layouts differ: resume with the saved setting")
    if want_opt:
        _init_distributed_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict({k: state[k] for k in model_keys}, is_loading=True,
                                                           metadata=_OPTIMIZER_METADATA)
    layout = _layout(groups)
    same_world = meta["world_size"] == world and meta.get("layout") == layout
    if same_world:
        state["rank_state"] = _rank_object(rank, world, None)
    else:
        logger.warning("checkpoint %s was saved by %d ranks with layout %s, this run has %d ranks with layout %s: "
                       "RNG states and rank_extra are not restored, so this resume is not bit-exact",
                       p, meta["world_size"], meta.get("layout"), world, layout)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        loaded = dist_checkpointing.load(state, str(p))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - bare EOFError, pickle errors, ...
        lines = str(exc).strip().splitlines() or [""]
        raise CheckpointError(f"checkpoint {p}: loading failed with {type(exc).__name__}: {lines[-1].rstrip('.'):.300}. "
                              f"Where: {locate_damage(p)}") from exc

    for key, chunk in zip(model_keys, model_chunks, strict=True):
        module = getattr(chunk, "module", chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {p}: model state {key!r} does not match the model; missing "
                                  f"{missing[:8]}, unexpected {list(unexpected)[:8]}")
    if want_opt:
        # no_grad: with fp32 params the distributed optimizer's main params are views of the model's
        # leaf params, and megatron copies the loaded shards into them in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    elif load_optimizer and optimizer is not None:
        logger.info("checkpoint %s holds no optimizer state (saved before the first step): optimizer starts fresh", p)
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise CheckpointError(f"checkpoint {p}: expected scheduler state, found none (saved without one)")
        scheduler.num_steps = 0  # megatron's load_state_dict adds the saved count to the current one
        changed = _schedule_changes(scheduler, loaded["scheduler"])
        if changed and getattr(scheduler, "override_opt_param_scheduler", False):
            logger.warning("checkpoint %s: continuing with this run's LR schedule (train.extend_steps): %s", p,
                           ", ".join(changed))
        try:
            scheduler.load_state_dict(loaded["scheduler"])
        except AssertionError as exc:
            raise CheckpointError(f"checkpoint {p}: its LR schedule differs from this run's optim/train settings "
                                  f"({', '.join(changed) or exc}); resume with the same optim.* and train.steps, "
                                  "or set train.extend_steps=true to continue with the new schedule") from exc
    extra = pickle.loads(loaded["extra"])
    rank_extra = None
    if same_world:
        rank_state = pickle.loads(loaded["rank_state"])
        rank_extra = rank_state["rank_extra"]
        restore_rng_state(rank_state["rng"])  # last: the loads above must not move any RNG after this
    return LoadedCheckpoint(path=p, step=int(meta["step"]), extra=extra, rank_extra=rank_extra, meta=meta)


# --------------------------------------------------------------------------------------------------
# The loop's two calls.

DEFAULT_KEEP_LAST = 3


def resume(cfg, run, run_dir: str | Path) -> tuple[int, dict]:
    """Apply `cfg.train.resume` to a built run: load the checkpoint (if any) into it.

    Restores model, optimizer, scheduler, every RNG and `run.sampler` (from `extra["data"]`).

    Args:
        cfg: the run `Config` (`train.resume`).
        run: an object with `.model` (DDP chunks), `.optimizer`, `.scheduler`, `.groups` and
            `.sampler` (`megafork.train.setup.Run`).
        run_dir: the run directory; checkpoints live in `run_dir/checkpoints`.

    Returns:
        (steps completed, the rest of `extra`): (0, {}) for a fresh start.

    Raises:
        CheckpointError: an explicit `train.resume` path that is unusable (named in the message), or
            a changed LR schedule without `train.extend_steps`.
    """
    path = resolve_resume(cfg.train.resume, checkpoints_root(run_dir))
    if path is None:
        return 0, {}
    # megatron's own switch: take the schedule from this run's config, the step count from the checkpoint.
    run.scheduler.override_opt_param_scheduler = bool(getattr(cfg.train, "extend_steps", False))
    loaded = load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.groups)
    extra = dict(loaded.extra)
    if "data" not in extra:
        raise CheckpointError(f"checkpoint {path}: expected the data sampler state in extra['data'], found keys "
                              f"{sorted(extra)}")
    run.sampler.load_state_dict(extra.pop("data"))
    logger.info("resumed from %s (%d steps completed)", path, loaded.step)
    return loaded.step, extra


def save(run, run_dir: str | Path, step: int, extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Save a run after `step` completed steps (adds `run.sampler`'s state as `extra["data"]`).

    Args:
        run: as for `resume`.
        run_dir: the run directory.
        step: RL steps completed.
        extra: more loop state (picklable, equal on all ranks).
        keep_last: checkpoints to keep; default `cfg.train.keep_last` when the config has that
            field, else 3 (0 keeps all).
    """
    if keep_last is None:
        keep_last = run.cfg.train.keep_last
    state = {**(extra or {}), "data": run.sampler.state_dict()}
    return save_checkpoint(checkpoints_root(run_dir), step, run.model, run.optimizer, run.scheduler, run.groups,
                           extra=state, keep_last=keep_last)

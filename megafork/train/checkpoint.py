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

dist_checkpointing writes each rank's shards in forked writer processes (megatron's
`FileSystemWriterAsync`, `thread_count` of them; on a CPU-only torch `megafork.compat` writes them
in-process instead). Its result queue would be created through a *spawn*-context Manager, a
process that re-imports `__main__` (seconds per process, and a hazard for scripts without an
`if __name__ == "__main__":` guard); the queue is only read by the saving process in a synchronous
save, so `sync_save_strategy` gives megatron a plain `queue.Queue` instead (reusable by any
`dist_checkpointing.save(..., sharded_strategy=sync_save_strategy())`).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

# Re-exported: together with this module they are the public checkpoint API.
from megafork.train.checkpoint_layout import (  # noqa: F401
    _STEP_RE,
    _TMP_RE,
    FORMAT_VERSION,
    LATEST_FILE,
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
from megafork.train.storage import StorageError, storage_error

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


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_str(text: str | None) -> str:
    if not dist.is_initialized():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)  # a directory fd can be fsynced on POSIX; makes renames/creations durable


def _model_sharded_state(model_chunks: list) -> dict:
    # `chunk.module`: the DDP wrapper would prefix every key with "module."; the plain keys keep
    # the model part loadable by megafork.models.qwen3.checkpoint and megatron tools.
    modules = [getattr(c, "module", c) for c in model_chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def _optimizer_has_state(optimizer) -> bool:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(len(o.optimizer.state) > 0 for o in inner)


def _rank_object(rank: int, world: int, payload: bytes | None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("megafork.rank_state", payload, (world,), (rank,), replica_id=0)


def sync_save_strategy(thread_count: int = 2):
    """megatron's torch_dist save strategy for synchronous saves, without the spawn-context Manager.

    Args:
        thread_count: writer buckets (files) per rank.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # See the module docstring: a synchronous save only reads this queue in this process.
    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=thread_count)


def _remove_stale(root: Path, keep: set[str]) -> None:
    for p in root.iterdir():
        if _TMP_RE.match(p.name) and p.name not in keep:
            logger.info("removing leftover %s (from an interrupted save or prune)", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _prune(root: Path, keep_last: int, protect: Path, nonce: str) -> None:
    if keep_last <= 0:
        return
    complete = list_checkpoints(root)
    for old in complete[:-keep_last]:
        if old.resolve() == protect.resolve():
            continue
        doomed = old.with_name(f"{old.name}.deleting-{nonce}")
        os.rename(old, doomed)  # atomic: the checkpoint name disappears at once
        shutil.rmtree(doomed, ignore_errors=True)


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


def _raise_everywhere(failure: StorageError | None) -> None:
    """Rank 0's failure (or None) reaches every rank, which all raise it instead of waiting in a barrier."""
    message = _broadcast_str(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise StorageError("rank 0", message)


# The distributed optimizer's layout on disk: each rank writes its own contiguous shard of the Adam
# state (parallel, no gather); it reloads under any DP size but the same TP/PP. megatron's default
# ("fully_sharded_model_space") needs flattened ShardedTensors, which this dist_checkpointing refuses.
# The plain optimizer ignores this key.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _publish(root: Path, tmp: Path, final: Path, step: int, world: int, model_keys: list, has_opt_state: bool,
             scheduler, groups, nonce: str, keep_last: int, distributed: bool = False) -> None:
    """Rank 0: write the meta file, rename the save into place, repoint `latest`, prune."""
    meta = {
        "format_version": FORMAT_VERSION, "step": int(step), "world_size": world, "model_keys": model_keys,
        "has_optimizer_state": has_opt_state, "has_scheduler": scheduler is not None,
        "distributed_optimizer": distributed, "layout": _layout(groups),
        "megatron_core": _megatron_version(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for f in tmp.iterdir():
        if f.is_file() and not f.name.startswith("__"):
            _fsync_file(f)
    meta_path = tmp / META_FILE
    meta_path.write_text(json.dumps(meta, indent=2))
    _fsync_file(meta_path)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old
        old = root / f"{final.name}.replaced-{nonce}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    pointer_tmp = root / f"{LATEST_FILE}.tmp-{nonce}"
    pointer_tmp.write_text(final.name + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST_FILE)
    _fsync_dir(root)
    _prune(root, keep_last, protect=final, nonce=nonce)


def _init_distributed_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer's torch Adam zero state (step, exp_avg, exp_avg_sq) to load into.

    Without apex/TE, megatron reads the step from every Adam state entry when it builds the
    loading state dict; torch.optim.Adam creates them only at its first step. The values are
    placeholders: the load overwrites every one of them.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                st = opt.optimizer.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)


def _restore_adam_steps(optimizer) -> None:
    """Give every torch Adam state entry of a loaded DistributedOptimizer its own, saved `step`.

    Without apex/TE, megatron's `DistributedOptimizer.load_state_dict` (megatron-core 0.16) keeps
    the step of a torch Adam in the param groups (`group["step"]`), then (1) writes one shared
    tensor into every parameter's state, which torch Adam increments in place once per parameter,
    and (2) overwrites it with the per-parameter "step" of the dp_reshardable shards, which
    dist_checkpointing does not store (the loading template's placeholder comes back). The
    group's step is the saved one; each entry gets its own copy of it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = opt.optimizer.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype)


def _layout(groups) -> dict:
    return {"tp": groups.tp_size, "pp": groups.pp_size, "cp": groups.cp_size, "dp": groups.dp_size}


def _megatron_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover - every supported version has it
        return "unknown"
    return __version__


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


def _schedule_changes(scheduler, saved: dict) -> list[str]:
    """'name: saved -> now' for each schedule setting that differs from the checkpoint's."""
    pairs = (("lr", "max_lr", "max_lr"), ("min_lr", "min_lr", "min_lr"),
             ("warmup steps", "lr_warmup_steps", "lr_warmup_steps"),
             ("decay steps", "lr_decay_steps", "lr_decay_steps"), ("decay style", "lr_decay_style", "lr_decay_style"),
             ("weight-decay steps", "wd_incr_steps", "wd_incr_steps"))
    return [f"{name} {saved[key]} -> {getattr(scheduler, attr)}" for name, key, attr in pairs
            if key in saved and saved[key] != getattr(scheduler, attr)]


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

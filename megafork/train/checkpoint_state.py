"""What a checkpoint holds in megatron-core's terms, and the fixes its optimizer load needs.

The sharded state dict of the model chunks, the per-rank `ShardedObject`, the distributed optimizer's
on-disk layout (and the Adam state a fresh one needs to load into), the LR-schedule comparison, and the
layout/version recorded in the meta. `megafork.train.checkpoint` saves and loads with these.

dist_checkpointing writes each rank's shards in forked writer processes (megatron's
`FileSystemWriterAsync`, `thread_count` of them; on a CPU-only torch `megafork.compat` writes them
in-process instead). Its result queue would be created through a *spawn*-context Manager, a
process that re-imports `__main__` (seconds per process, and a hazard for scripts without an
`if __name__ == "__main__":` guard); the queue is only read by the saving process in a synchronous
save, so `sync_save_strategy` gives megatron a plain `queue.Queue` instead (reusable by any
`dist_checkpointing.save(..., sharded_strategy=sync_save_strategy())`).
"""
from __future__ import annotations

import queue

import torch


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


# The distributed optimizer's layout on disk: each rank writes its own contiguous shard of the Adam
# state (parallel, no gather); it reloads under any DP size but the same TP/PP. megatron's default
# ("fully_sharded_model_space") needs flattened ShardedTensors, which this dist_checkpointing refuses.
# The plain optimizer ignores this key.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in inner)


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


def _schedule_changes(scheduler, saved: dict) -> list[str]:
    """'name: saved -> now' for each schedule setting that differs from the checkpoint's."""
    pairs = (("lr", "max_lr", "max_lr"), ("min_lr", "min_lr", "min_lr"),
             ("warmup steps", "lr_warmup_steps", "lr_warmup_steps"),
             ("decay steps", "lr_decay_steps", "lr_decay_steps"), ("decay style", "lr_decay_style", "lr_decay_style"),
             ("weight-decay steps", "wd_incr_steps", "wd_incr_steps"))
    return [f"{name} {saved[key]} -> {getattr(scheduler, attr)}" for name, key, attr in pairs
            if key in saved and saved[key] != getattr(scheduler, attr)]

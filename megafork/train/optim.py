"""megatron-core DDP, Adam and the LR/WD schedule, wired for megatron's per-token loss contract.

    model = build_qwen3(hf, opts, groups)
    enable_per_token_loss(model)                        # BEFORE wrap_ddp: DDP reads it
    ddp = wrap_ddp(model, groups, cfg.optim)
    optimizer, scheduler = build_optimizer(cfg.optim, [ddp], total_steps=cfg.train.steps, groups=groups)
    ...                                                 # forward_backward_func(model=[ddp], ...)
    update_ok, grad_norm, _ = optimizer.step()
    scheduler.step(1)                                   # once per RL step (see `build_optimizer`)

Public API:
    enable_per_token_loss(model_or_chunks) -> None
    wrap_ddp(model, groups, optim_cfg=None, *, disable_bucketing=False) -> DistributedDataParallel
    finish_param_sync(model_chunks) -> None   (after the step's last optimizer.step())
    build_optimizer(optim_cfg, model_chunks, total_steps, groups=None) -> (MegatronOptimizer, OptimizerParamScheduler)
    configure_schedule(model_chunks, optimizer, groups=None) -> None   (called by build_optimizer)
    current_lr(optimizer) -> float

The per-token loss contract (megatron's `calculate_per_token_loss=True`): the loss_func given to
`forward_backward_func` returns `(sum_of_token_losses, num_tokens, metrics)`. The schedule does not
divide by the micro-batch count; `finalize_model_grads` all-reduces `num_tokens` summed over the
micro-batches over DP x CP (broadcast from the last PP stage) and scales every gradient by
1 / that total. DDP must then sum (not average) over DP, which it only does when the flag is set
on the TransformerConfig *before* `DistributedDataParallel` is built - hence `enable_per_token_loss`
and the check in `wrap_ddp`.
"""
from __future__ import annotations

import functools

import torch

_DECAY_STYLES = {"constant": "constant", "cosine": "cosine", "linear": "linear"}


def _model_config(model):
    from megatron.core.utils import get_model_config

    return get_model_config(model)


def enable_per_token_loss(model_or_chunks) -> None:
    """Switch the model's TransformerConfig to megatron's per-token loss normalisation.

    The config object is shared by every submodule, so setting the field on it is enough. It must
    happen before `wrap_ddp`: megatron DDP fixes its gradient scaling (1.0 instead of 1/dp) when it
    is built.

    Args:
        model_or_chunks: the unwrapped model (megatron module) or a list of model chunks.
    """
    chunks = model_or_chunks if isinstance(model_or_chunks, list | tuple) else [model_or_chunks]
    for chunk in chunks:
        _model_config(chunk).calculate_per_token_loss = True


def wrap_ddp(model, groups, optim_cfg=None, *, disable_bucketing: bool = False):
    """Wrap one model chunk in megatron-core `DistributedDataParallel`.

    The DDP config comes from `optim_cfg` (`optim.grad_reduce_in_fp32`, `optim.overlap_grad_reduce`,
    `optim.distributed_optimizer`, `optim.overlap_param_gather`); without one it is fp32 gradient
    buffers, no overlap and no distributed optimizer. With `calculate_per_token_loss=True` on the
    model config DDP sums gradients over DP and `finalize_model_grads` divides by the global token
    count.

    Args:
        model: this rank's model chunk (e.g. `build_qwen3(...)`), already on its device.
        groups: `megafork.distributed.ParallelGroups` (its `pg_collection` is passed to DDP).
        optim_cfg: `megafork.train.config.OptimConfig` (None: the defaults above). Pass the same
            one to `build_optimizer`.
        disable_bucketing: put every parameter in one bucket (megatron does this for virtual
            pipeline chunks after the first).

    Returns:
        The `DistributedDataParallel` module; `ddp.module` is the model.

    Raises:
        ValueError: if the model config lacks `calculate_per_token_loss=True` (call
            `enable_per_token_loss` first; the loss contract of megafork's loop needs it).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = _model_config(model)
    if not config.calculate_per_token_loss:
        raise ValueError("wrap_ddp: expected the model's TransformerConfig to have calculate_per_token_loss=True "
                         "(megafork's loss returns (sum, num_tokens, metrics)), found False; call "
                         "megafork.train.optim.enable_per_token_loss(model) before wrapping")
    o = optim_cfg
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True if o is None else o.grad_reduce_in_fp32,
        overlap_grad_reduce=False if o is None else o.overlap_grad_reduce,
        use_distributed_optimizer=False if o is None else o.distributed_optimizer,
        overlap_param_gather=False if o is None else o.overlap_param_gather)
    return DistributedDataParallel(config, ddp_config, model, disable_bucketing=disable_bucketing,
                                   pg_collection=groups.pg_collection)


def finish_param_sync(model_chunks: list) -> None:
    """Make every parameter current after the last `optimizer.step()` of a step.

    With `optim.overlap_param_gather` the distributed optimizer's all-gather of updated params is
    left to the next forward pass's pre-hooks; the weight export and checkpoints read the params
    directly, so they gather here first (megatron's training loop does the same before saving).
    """
    for chunk in model_chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def _optimizer_config(optim_cfg, model_config):
    from megatron.core.optimizer import OptimizerConfig

    dtype = model_config.params_dtype
    return OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        # megatron skips clipping at 0 (clip_grad > 0 check) - the config's "0 disables".
        clip_grad=optim_cfg.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        # megatron's default: dynamic loss scaling for fp16 (initial 2^32), none for bf16/fp32.
        use_distributed_optimizer=optim_cfg.distributed_optimizer,
        optimizer_cpu_offload=optim_cfg.cpu_offload,
        optimizer_offload_fraction=1.0 if optim_cfg.cpu_offload else 0.0,
    )


def build_optimizer(optim_cfg, model_chunks: list, total_steps: int, groups=None):
    """Adam (megatron-core `get_megatron_optimizer`) plus `OptimizerParamScheduler`.

    Mixed precision follows the model: bf16/fp16 parameters get fp32 main parameters inside the
    optimizer (fp16 also gets megatron's dynamic loss scaler); fp32 models use the plain fp32
    optimizer. Weight decay is decoupled (AdamW) and, as in megatron, not applied to 1-D
    parameters (norm weights) or biases.

    The schedule counts RL steps: call `scheduler.step(1)` once after each RL step (after all its
    mini-batch `optimizer.step()`s). Step s (0-based) trains at
    `lr * min(1, s / warmup_steps)` during warm-up (megatron's and verl's convention: step 0 uses
    lr 0 when warmup_steps > 0), then `constant`, `cosine` or `linear` decay to `min_lr` at
    `total_steps`. Weight decay is constant at `optim_cfg.weight_decay`.

    Also calls `configure_schedule`, so `forward_backward_func` finalises and scales gradients.

    Args:
        optim_cfg: `megafork.train.config.OptimConfig`.
        model_chunks: the DDP-wrapped model chunks (`[wrap_ddp(model, groups)]`).
        total_steps: RL steps of the run (`cfg.train.steps`); the decay ends there.
        groups: `ParallelGroups`; its `pg_collection` gives the optimizer its DP and model-parallel
            groups (for the grad-norm all-reduce). None uses megatron's global parallel state.

    Returns:
        (optimizer, scheduler): a megatron `MegatronOptimizer` and `OptimizerParamScheduler`.

    Raises:
        ValueError: `optim.warmup_steps` not below `total_steps`, `total_steps` < 1, or a
            bf16/fp16 model on a CPU-only torch (megatron's fp16 optimizer is CUDA-only).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if total_steps < 1:
        raise ValueError(f"train.steps: expected >= 1 for the LR schedule, found {total_steps}")
    if optim_cfg.warmup_steps >= total_steps:
        raise ValueError(f"optim.warmup_steps: expected < train.steps={total_steps} (the warm-up must end "
                         f"before the schedule does), found {optim_cfg.warmup_steps}")
    if not model_chunks or not all(hasattr(c, "ddp_config") for c in model_chunks):
        raise ValueError("build_optimizer: expected a non-empty list of DDP-wrapped chunks (wrap_ddp), "
                         f"found {[type(c).__name__ for c in model_chunks]}")
    model_config = _model_config(model_chunks[0])
    _check_ddp_matches(optim_cfg, model_chunks)
    if optim_cfg.cpu_offload:
        _check_cpu_offload_available()
    if model_config.params_dtype != torch.float32 and not torch.cuda.is_available():
        # Float16OptimizerWithFloat16Params accepts only torch.cuda.{Half,BFloat16}Tensor params.
        raise ValueError(f"model.dtype: megatron's mixed-precision optimizer needs CUDA tensors; expected "
                         f"float32 on a CPU-only torch, found {model_config.params_dtype}")
    config = _optimizer_config(optim_cfg, model_config)
    pgc = None if groups is None else groups.pg_collection
    # With an explicit collection megatron refuses gloo side-groups; the non-distributed
    # optimizer does not need them.
    optimizer = get_megatron_optimizer(config, list(model_chunks), pg_collection=pgc,
                                       use_gloo_process_groups=pgc is None)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=_DECAY_STYLES[optim_cfg.schedule],
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        # On resume the checkpoint's schedule must equal this run's (a changed lr/steps is an
        # error from megatron's _check_and_set, not silently taken from either side).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )
    configure_schedule(model_chunks, optimizer, groups)
    return optimizer, scheduler


def _check_ddp_matches(optim_cfg, model_chunks: list) -> None:
    # DistributedOptimizer needs DDP's sharded grad buffers: both sides must agree.
    for i, chunk in enumerate(model_chunks):
        ddp = chunk.ddp_config
        if ddp.use_distributed_optimizer != optim_cfg.distributed_optimizer:
            raise ValueError(f"optim.distributed_optimizer={optim_cfg.distributed_optimizer}: model chunk {i} was "
                             f"wrapped with use_distributed_optimizer={ddp.use_distributed_optimizer}; pass the same "
                             "optim config to wrap_ddp")


def _check_cpu_offload_available() -> None:
    """optim.cpu_offload runs megatron's HybridDeviceOptimizer: host Adam fed from CUDA grads."""
    if not torch.cuda.is_available():
        raise ValueError("optim.cpu_offload: not available on a CPU-only torch (the optimizer state already lives "
                         "in host memory here); set optim.cpu_offload=false")
    try:
        from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"optim.cpu_offload: not available with this megatron-core ({exc}); set "
                         "optim.cpu_offload=false") from exc


def configure_schedule(model_chunks: list, optimizer, groups=None) -> None:
    """Set what megatron's `forward_backward_func` reads from the TransformerConfig.

    - `finalize_model_grads_func`: megatron's `finalize_model_grads` bound to the groups: DP
      all-reduce of the grad buffers, tied-embedding and non-TP grads, then the 1/num_tokens scale.
    - `no_sync_func`: DDP's `no_sync` (one per chunk), so only the last micro-batch reduces.
    - `grad_scale_func`: the fp16 loss scaler's `scale_loss` (fp16 only; None otherwise).

    Args:
        model_chunks: the DDP-wrapped chunks.
        optimizer: the megatron optimizer of these chunks.
        groups: `ParallelGroups` (None: megatron's global parallel state).
    """
    from megatron.core.distributed import finalize_model_grads

    config = _model_config(model_chunks[0])
    pgc = None if groups is None else groups.pg_collection
    config.finalize_model_grads_func = functools.partial(finalize_model_grads, pg_collection=pgc)
    no_sync = [c.no_sync for c in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_scale_func = optimizer.scale_loss if config.fp16 else None


def current_lr(optimizer) -> float:
    """The learning rate the next `optimizer.step()` uses (first parameter group)."""
    return float(optimizer.param_groups[0]["lr"])

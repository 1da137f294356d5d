"""Everything a run needs before its first step: model, optimizer, engine, data, logger."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import torch

from megafork.data.dataset import PromptDataset, load_tokenizer
from megafork.data.sampler import PromptSampler
from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3, load_hf_weights, read_hf_config
from megafork.models.qwen3.checkpoint import build_from_megatron_checkpoint
from megafork.pipeline import PolicyLossConfig
from megafork.rewards import get_reward
from megafork.train.optim import build_optimizer, enable_per_token_loss, wrap_ddp
from megafork.train.packing import PackingSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Run:
    """The live objects of a training run (built by `build_run`)."""

    cfg: object
    groups: object
    model: list            # DDP-wrapped chunks
    optimizer: object
    scheduler: object
    vocab_size: int
    loss_cfg: PolicyLossConfig
    tokenizer: object
    dataset: PromptDataset
    eval_dataset: PromptDataset | None
    sampler: PromptSampler
    reward_fn: object
    packing: PackingSpec = None  # micro-batch layout (token budget or padded rows)
    engine: object = None   # rank 0 only
    sender: object = None   # rank 0 only

    @staticmethod
    def resolve_pad_multiple(pad_multiple: int, device) -> int:
        """`train.pad_multiple`, with 0 (auto) meaning 128 on CUDA and 1 elsewhere."""
        return pad_multiple or (128 if device.type == "cuda" else 1)

    @property
    def unwrapped(self):
        return self.model[0].module


def build_run(cfg, groups) -> Run:
    """Build model (HF weights or a megatron checkpoint), optimizer, data and, on rank 0, the engine."""
    _check_layout(cfg, groups)
    # Data first: a bad row should stop the run before minutes of model loading.
    tokenizer = load_tokenizer(cfg.model.hf_path)
    dataset = PromptDataset.from_config(cfg.data, tokenizer)
    eval_dataset = PromptDataset.from_config(cfg.data, tokenizer, path=cfg.eval.path) if cfg.eval.path else None
    # Rank 0 draws every prompt (it drives the engine); all ranks keep the same sampler state.
    sampler = PromptSampler(len(dataset), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
    # The engine too: an unreachable server should stop the run before model loading.
    engine, sender = _build_engine(cfg) if groups.rank == 0 else (None, None)

    opts = Qwen3BuildOptions(dtype=_DTYPES[cfg.model.dtype],
                             spec="te" if cfg.model.transformer_impl == "transformer_engine" else "local",
                             use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=False,
                             sequence_parallel=cfg.parallel.sequence_parallel, **cfg.model.build_options())
    if cfg.model.megatron_path:  # its padded vocab and config come from the checkpoint's metadata
        model, _ = build_from_megatron_checkpoint(cfg.model.megatron_path, groups, opts)
        ours, theirs = (dataclasses.replace(c, source="") for c in (read_hf_config(cfg.model.hf_path), model.hf_config))
        if ours != theirs:  # the engine and tokenizer come from hf_path: they must be the same model
            raise ValueError(f"model.megatron_path {cfg.model.megatron_path!r}: expected the model of model.hf_path "
                             f"({ours}), found {theirs}")
    else:
        model = build_qwen3(read_hf_config(cfg.model.hf_path), opts, groups)
        load_hf_weights(model, cfg.model.hf_path, groups)
    hf = model.hf_config
    model.config.variable_seq_lengths = groups.pp_size > 1  # micro-batches are padded per batch
    enable_per_token_loss(model)
    chunks = [wrap_ddp(model, groups, cfg.optim)]
    optimizer, scheduler = build_optimizer(cfg.optim, chunks, total_steps=cfg.train.steps, groups=groups)

    fk = cfg.forking
    loss_cfg = PolicyLossConfig(
        clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, clip_ratio_c=cfg.algo.clip_ratio_c,
        normalizer=cfg.algo.normalizer, temperature=cfg.rollout.temperature,
        chunk_size=cfg.model.head_chunk_tokens or None,
        local_ratio=fk.ratio if fk.scope == "local" else None, local_mode=fk.mode if fk.scope == "local" else "top",
        rollout_correction=cfg.algo.rollout_correction, rollout_is_cap=cfg.algo.rollout_is_cap,
        rollout_mask_low=cfg.algo.rollout_mask_low, rollout_mask_high=cfg.algo.rollout_mask_high)
    run = Run(cfg=cfg, groups=groups, model=chunks, optimizer=optimizer, scheduler=scheduler,
              vocab_size=hf.vocab_size, loss_cfg=loss_cfg, tokenizer=tokenizer, dataset=dataset,
              eval_dataset=eval_dataset, sampler=sampler, reward_fn=get_reward(cfg.data.reward),
              packing=packing_spec(cfg, groups, tokenizer), engine=engine, sender=sender)
    return run


def sp_pad_multiple(pad_multiple: int, cfg, groups) -> int:
    """Under sequence parallelism every micro-batch length must also split evenly over the TP ranks.

    The extra positions are right padding: causal attention keeps them out of every real token's
    context and they carry no label.
    """
    return math.lcm(pad_multiple, groups.tp_size) if cfg.parallel.sequence_parallel else pad_multiple


def packing_spec(cfg, groups, tokenizer) -> PackingSpec:
    """The micro-batch layout of the run; says so at start-up when a token budget replaces the rows."""
    t = cfg.train
    pad = getattr(tokenizer, "pad_token_id", None)
    # train.pad_multiple (allocator-friendly lengths on GPU) and, under sequence parallelism, TP:
    # the sequence is split over TP ranks, so a row's length must divide by TP.
    multiple = sp_pad_multiple(Run.resolve_pad_multiple(t.pad_multiple, groups.device), cfg, groups)
    spec = PackingSpec(max_tokens=t.max_tokens_per_microbatch, micro_batch_size=t.micro_batch_size,
                       pad_id=int(pad) if pad is not None else 0, multiple=multiple)
    if spec.max_tokens and groups.rank == 0:
        log.info("train.max_tokens_per_microbatch=%d replaces train.micro_batch_size=%d: sequences are packed "
                 "without padding into rows of at most %d tokens (%s attention)", spec.max_tokens,
                 t.micro_batch_size, spec.max_tokens,
                 "THD" if cfg.model.transformer_impl == "transformer_engine" else "block-diagonal mask")
    if t.dp_balance != "off" and groups.rank == 0:
        log.info("train.dp_balance=%s: each mini-batch's sequences go to DP ranks by cost L + %g*L^2",
                 t.dp_balance, t.balance_quadratic)
    return spec


def _build_engine(cfg):
    from megafork.rollout import (
        EmbeddedEngine,
        HttpWeightSender,
        LocalWeightSender,
        SGLangEngine,
        WeightSyncConfig,
    )
    from megafork.rollout.deploy import resolve_master_addr

    r = cfg.rollout
    sync_cfg = WeightSyncConfig(bucket_bytes=r.weight_sync_bucket_mb << 20, verify_checksums=r.weight_sync_checksum,
                                master_port=r.weight_sync_port, timeout_s=r.weight_sync_timeout_s)
    if r.engine == "embedded":
        engine = EmbeddedEngine.from_pretrained(cfg.model.hf_path, max_batch_rows=r.batch_size)
        return engine, LocalWeightSender(engine, sync_cfg)
    kwargs = dict(timeout_s=r.request_timeout_s, retries=r.request_retries,
                  max_inflight_per_server=r.max_inflight_per_server, progress=cfg.log.progress_bar)
    engine = SGLangEngine.launch(launch_config(cfg), **kwargs) if r.sglang_launch else SGLangEngine(r.sglang_urls, **kwargs)
    sync_cfg.master_address = resolve_master_addr(r.weight_sync_master_addr, engine.urls)
    sender = HttpWeightSender(engine.urls, sync_cfg)
    try:
        sender.connect()
    except BaseException:
        engine.close()  # stops servers it launched
        raise
    return engine, sender


def launch_config(cfg, local_world_size: int | None = None):
    """`rollout.sglang_launch_*` as an `SGLangLaunchConfig`, refusing GPUs the trainer uses on this node.

    Args:
        cfg: the run config.
        local_world_size: trainer ranks on this node (default: torchrun's LOCAL_WORLD_SIZE).
    """
    from megafork.rollout import SGLangLaunchConfig
    from megafork.rollout.deploy import check_gpu_layout

    r = cfg.rollout
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_world_size is None else local_world_size
    check_gpu_layout(local, r.sglang_launch_base_gpu_id, r.sglang_launch_servers, r.sglang_launch_tp,
                     torch.cuda.device_count() if torch.cuda.is_available() else None)
    return SGLangLaunchConfig(model_path=cfg.model.hf_path, num_servers=r.sglang_launch_servers,
                              tp_size=r.sglang_launch_tp, base_port=r.sglang_launch_base_port,
                              base_gpu_id=r.sglang_launch_base_gpu_id, extra_args=list(r.sglang_launch_args))


def _check_layout(cfg, groups) -> None:
    """Rules that depend on the DP size (the rest is checked when the config loads)."""
    dp = groups.dp_size
    if groups.cp_size > 1:
        raise ValueError(f"parallel.cp: expected 1 (the trainer does not yet split sequences over context-parallel "
                         f"ranks, so CP would train on wrong attention), found {groups.cp_size}")
    t = cfg.train
    if t.minibatch_prompts % dp:
        raise ValueError(f"train.minibatch_prompts: expected a multiple of the data-parallel size {dp}, "
                         f"found {t.minibatch_prompts}")
    if not torch.cuda.is_available() and cfg.model.dtype != "float32":
        log.warning("model.dtype=%s on a CPU-only torch: bf16/fp16 matmuls are slow on CPU; float32 is "
                    "recommended for CPU runs", cfg.model.dtype)

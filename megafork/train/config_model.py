"""The `model` and `optim` config sections: what is trained, and the memory knobs that make it fit.

Every memory knob is megatron-core's own, passed through unchanged:

- `model.recompute` (+ `recompute_method`, `recompute_num_layers`, `recompute_modules`) ->
  `TransformerConfig.recompute_*` (activation recomputation);
- `optim.distributed_optimizer` -> megatron's `DistributedOptimizer` (Adam state and fp32 main
  params sharded over DP; saved and loaded through dist_checkpointing);
- `optim.overlap_grad_reduce`, `optim.overlap_param_gather`, `optim.grad_reduce_in_fp32` ->
  `DistributedDataParallelConfig`;
- `optim.cpu_offload` -> `OptimizerConfig.optimizer_cpu_offload` (GPU only).

Sequence parallelism is `parallel.sequence_parallel` (see `megafork.distributed.ParallelConfig`).
A knob that is set but would not be read by the chosen mode is an error naming it, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megafork.train.config_types import _check_types, _positive, _require

# Selective-recompute modules of megatron's dense transformer layer (TransformerConfig.recompute_modules).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
_DEFAULT_MODULES = ["core_attn"]


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        hf_path: HF Qwen3 directory (config.json, safetensors, tokenizer); also the rollout weights.
        megatron_path: a megatron dist checkpoint to start from instead ("" = convert `hf_path`).
        dtype: parameter/compute dtype of the trainer.
        transformer_impl: megatron layer spec; "transformer_engine" needs TE on GPU.
        head_chunk_tokens: tokens per chunk of the fused LM head (bounds the [chunk, V/tp] fp32
            logits); 0 = the op's own bound, 2**25 / (V/tp) rows (two 128 MiB buffers).
        recompute: activation recomputation: "none", "selective" (the `recompute_modules` of
            every layer) or "full" (whole layers, see `recompute_method`).
        recompute_method: with "full": "uniform" keeps only the input of each chunk of
            `recompute_num_layers` layers; "block" recomputes the first `recompute_num_layers`
            layers of each pipeline stage and keeps the rest.
        recompute_num_layers: with "full": layers per chunk (uniform) or per stage (block).
        recompute_modules: with "selective": any of "core_attn" (attention scores/softmax),
            "mlp", "layernorm" (transformer_engine only).
    """

    hf_path: str = ""
    megatron_path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    head_chunk_tokens: int = 0
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: list[str] = field(default_factory=lambda: list(_DEFAULT_MODULES))

    def __post_init__(self):
        _check_types(self, "model")
        _positive(self, "model", "head_chunk_tokens", allow_zero=True)
        if self.recompute != "full":
            _require(self.recompute_method == "uniform", "model.recompute_method",
                     f"to be left unset (it is read only with model.recompute='full', this config has "
                     f"{self.recompute!r})", self.recompute_method)
            _require(self.recompute_num_layers == 1, "model.recompute_num_layers",
                     f"to be left unset (it is read only with model.recompute='full', this config has "
                     f"{self.recompute!r})", self.recompute_num_layers)
        else:
            _positive(self, "model", "recompute_num_layers")
        if self.recompute != "selective":
            _require(self.recompute_modules == _DEFAULT_MODULES, "model.recompute_modules",
                     f"to be left unset (it is read only with model.recompute='selective', this config has "
                     f"{self.recompute!r})", self.recompute_modules)
        else:
            _require(bool(self.recompute_modules), "model.recompute_modules",
                     f"at least one of {list(RECOMPUTE_MODULES)} with model.recompute='selective'",
                     self.recompute_modules)
            for i, m in enumerate(self.recompute_modules):
                _require(m in RECOMPUTE_MODULES, f"model.recompute_modules[{i}]", f"one of {list(RECOMPUTE_MODULES)}", m)
            _require(len(set(self.recompute_modules)) == len(self.recompute_modules), "model.recompute_modules",
                     "no repeated module", self.recompute_modules)
            # megatron-core 0.16's CheckpointWithoutOutput (layernorm recompute) reads TE's FP8 state.
            _require("layernorm" not in self.recompute_modules or self.transformer_impl == "transformer_engine",
                     "model.recompute_modules", "no 'layernorm' with model.transformer_impl='local' (megatron "
                     "recomputes norms through transformer-engine)", self.recompute_modules)

    def build_options(self) -> dict:
        """The recompute fields of `megafork.models.qwen3.Qwen3BuildOptions` for this config."""
        if self.recompute == "none":
            return {}
        if self.recompute == "selective":
            return {"recompute_granularity": "selective", "recompute_modules": list(self.recompute_modules)}
        return {"recompute_granularity": "full", "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}


@dataclass
class OptimConfig:
    """Adam with warm-up and a schedule (paper: lr 1e-6, 10 warm-up steps, wd 0.1, clip 1.0).

    Attributes:
        lr: peak learning rate.
        min_lr: floor of the cosine/linear decay.
        warmup_steps: linear warm-up from 0.
        schedule: "constant", "cosine" or "linear" after warm-up (decay ends at `train.steps`).
        weight_decay: decoupled weight decay.
        grad_clip: global grad-norm clip (0 disables).
        adam_beta1, adam_beta2, adam_eps: Adam's constants.
        distributed_optimizer: megatron's DistributedOptimizer: fp32 main params and Adam moments
            sharded over the DP ranks (12 bytes/param / dp instead of 12); grads reduce-scattered,
            params all-gathered.
        overlap_grad_reduce: start each gradient bucket's DP reduction during the backward pass.
        overlap_param_gather: with the distributed optimizer, all-gather updated params during the
            next forward pass (needs overlap_grad_reduce).
        grad_reduce_in_fp32: keep the DP gradient buffers (and their reduction) in fp32; false
            keeps them in the bf16/fp16 param dtype (half the grad memory, rounded sums).
        cpu_offload: megatron's optimizer CPU offload (Adam state and step on the host; needs the
            distributed optimizer and CUDA).
    """

    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True
    cpu_offload: bool = False

    def __post_init__(self):
        _check_types(self, "optim")
        _positive(self, "optim", "lr", "adam_eps")
        _positive(self, "optim", "min_lr", "warmup_steps", "weight_decay", "grad_clip", allow_zero=True)
        _require(self.min_lr <= self.lr, "optim.min_lr", f"<= optim.lr={self.lr}", self.min_lr)
        for n in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, n) < 1.0, f"optim.{n}", "a float in [0, 1)", getattr(self, n))
        if self.overlap_param_gather:
            _require(self.distributed_optimizer, "optim.overlap_param_gather",
                     "false unless optim.distributed_optimizer=true (only its param all-gather can overlap)", True)
            _require(self.overlap_grad_reduce, "optim.overlap_param_gather",
                     "false unless optim.overlap_grad_reduce=true (megatron overlaps both or neither)", True)
        _require(not self.cpu_offload or self.distributed_optimizer, "optim.cpu_offload",
                 "false unless optim.distributed_optimizer=true (megatron offloads the sharded state)", True)

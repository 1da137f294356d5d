"""Per-GPU memory of a training config, stage by stage, and the cheapest knob that makes it fit.

    plan = plan_memory(cfg, hf, gpus=32, gpu_mem_gib=80.0)
    plan.fits, plan.stages[0].total_gib, plan.fixes

What each stage holds, per GPU (dtype bytes p: 2 for bf16):
- weights: params · p (params exact, `megafork.plan.params`);
- grads: DDP's main_grad buffer, params · 4 (`optim.grad_reduce_in_fp32`) or · p;
- optimizer: fp32 main params (bf16/fp16 models only) and Adam's two moments, 12 (or 8) bytes a
  param, divided by DP with `optim.distributed_optimizer`;
- activations: the worst micro-batch (micro_batch_size rows of max_prompt_len +
  max_response_len tokens, padded to TP under SP) times the micro-batches in flight on the stage
  (1F1B: pp - stage), `megafork.plan.activations`, plus one recompute unit replaying in the backward;
- other: the fused LM-head workspace on the last stage (`head_workspace_bytes`: two [chunk, V/tp]
  fp32 buffers, a bf16 [chunk, V/tp] gradient operand, the [T, h] hidden gradient and the fp32
  [V/tp, h] weight gradient it holds until the backward; plus the [T, h] gathered hidden states
  under SP), the step's micro-batches resident on the GPU
  (42 bytes a token: ids, positions, labels int64; advantages, rollout/old log-probs, entropy
  fp32; response and fork masks), and an allowance of ALLOWANCE_GIB for the CUDA context, NCCL
  communicators and buffers, plus FRAGMENTATION of everything else for the caching allocator.

A stage fits when its total is at most `margin` (0.85) of the GPU's memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megafork.ops.vocab_stats import default_chunk
from megafork.plan.activations import LayerShape, recompute_workspace_bytes, stage_bytes

GIB = 1024**3
ALLOWANCE_GIB = 2.5       # CUDA context (~0.5-1 GiB) + NCCL communicators and buffers (~1.5 GiB)
FRAGMENTATION = 0.05      # caching-allocator slack on top of everything else
RESIDENT_BYTES_PER_TOKEN = 3 * 8 + 4 * 4 + 2 * 1
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class StagePlan:
    """One pipeline stage, per GPU (JSON field names are part of `megafork plan --json`)."""

    stage: int
    params: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    other_gib: float
    total_gib: float
    in_flight: int = 0
    head_workspace_gib: float = 0.0
    resident_gib: float = 0.0
    allowance_gib: float = 0.0

    def json(self) -> dict:
        keys = ("stage", "params", "weights_gib", "grads_gib", "optimizer_gib", "activations_gib", "other_gib",
                "total_gib")
        return {k: (round(getattr(self, k), 3) if k.endswith("_gib") else getattr(self, k)) for k in keys}


@dataclass
class MemoryPlan:
    """The whole plan: per-stage figures, the verdict and, if it fails, the cheapest single fix."""

    gpu_mem_gib: float
    margin: float
    gpus: int
    dp: int
    tokens: int
    stages: list[StagePlan]
    fixes: dict[int, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return all(s.total_gib <= self.margin * self.gpu_mem_gib for s in self.stages)

    def json(self) -> dict:
        return {"gpu_mem_gib": float(self.gpu_mem_gib), "fits": self.fits, "stages": [s.json() for s in self.stages]}


def plan_memory(cfg, hf, gpus: int | None = None, gpu_mem_gib: float = 80.0, margin: float = 0.85,
                param_counts: list[int] | None = None, suggest: bool = True) -> MemoryPlan:
    """Plan a config's per-GPU memory on every pipeline stage.

    Args:
        cfg: the resolved run `Config` (`load_config`).
        hf: its model's `Qwen3HFConfig`.
        gpus: GPUs of the run (DP = gpus / (tp·pp·cp)); None = one model replica (DP = 1).
        gpu_mem_gib: memory of one GPU.
        margin: the fraction of it a stage may use.
        param_counts: per-stage counts if already known (else built on the meta device).
        suggest: look for the cheapest single knob that makes failing stages fit.

    Raises:
        ValueError: `gpus` not a multiple of the model-parallel size (the message names it).
    """
    from megafork.plan.params import stage_param_counts

    par = cfg.parallel
    mp = par.tp * par.pp * par.cp
    gpus = mp if gpus is None else gpus
    if gpus < mp or gpus % mp:
        raise ValueError(f"--gpus: expected a multiple of parallel.tp*pp*cp = {mp}, found {gpus}")
    dp = gpus // mp
    if param_counts is None:
        param_counts = stage_param_counts(hf, par.tp, par.pp)
    p = _DTYPE_BYTES[cfg.model.dtype]
    longest = cfg.data.max_prompt_len + cfg.rollout.max_response_len
    # A packed micro-batch (train/packing.py) is one row of the token budget, or one longer sequence.
    budget = cfg.train.max_tokens_per_microbatch
    b, seq = (1, max(budget, longest)) if budget else (cfg.train.micro_batch_size, longest)
    if par.sequence_parallel:
        seq = -(-seq // par.tp) * par.tp
    ls = LayerShape(hidden=hf.hidden_size, ffn=hf.intermediate_size, heads=hf.num_attention_heads,
                    kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, tp=par.tp,
                    sequence_parallel=par.sequence_parallel, act_bytes=p,
                    flash=cfg.model.transformer_impl == "transformer_engine")
    m = cfg.model
    rc = dict(recompute=m.recompute, method=m.recompute_method, num_layers=m.recompute_num_layers,
              modules=tuple(m.recompute_modules) if m.recompute == "selective" else ())
    layers = hf.num_hidden_layers // par.pp
    sequences = cfg.train.prompts_per_step * cfg.algo.n // dp
    resident = sequences * longest * RESIDENT_BYTES_PER_TOKEN
    stages = []
    for stage, params in enumerate(param_counts):
        first, last = stage == 0, stage == par.pp - 1
        in_flight = par.pp - stage
        weights = params * p
        grads = params * (4 if cfg.optim.grad_reduce_in_fp32 else p)
        opt = params * (8 + (4 if p < 4 else 0))
        if cfg.optim.distributed_optimizer:
            opt /= dp
        if cfg.optim.cpu_offload:  # optimizer_offload_fraction=1.0: fp32 main params and Adam on the host
            opt = 0.0
        act = in_flight * stage_bytes(ls, b, seq, layers, first, last, rc["recompute"], rc["method"],
                                      rc["num_layers"], rc["modules"])
        act += recompute_workspace_bytes(ls, b, seq, layers, rc["recompute"], rc["method"], rc["num_layers"],
                                         rc["modules"])
        head = _head_workspace(cfg, hf, b * seq, p) if last else 0.0
        body = weights + grads + opt + act + head + resident
        allowance = ALLOWANCE_GIB * GIB + FRAGMENTATION * body
        other = head + resident + allowance
        stages.append(StagePlan(stage=stage, params=params, weights_gib=weights / GIB, grads_gib=grads / GIB,
                                optimizer_gib=opt / GIB, activations_gib=act / GIB, other_gib=other / GIB,
                                total_gib=(body + allowance) / GIB, in_flight=in_flight,
                                head_workspace_gib=head / GIB, resident_gib=resident / GIB,
                                allowance_gib=allowance / GIB))
    plan = MemoryPlan(gpu_mem_gib=gpu_mem_gib, margin=margin, gpus=gpus, dp=dp, tokens=b * seq, stages=stages)
    if suggest and not plan.fits:
        plan.fixes = _cheapest_fixes(cfg, hf, plan, param_counts)
    return plan


def _head_workspace(cfg, hf, tokens: int, p: int) -> float:
    from megafork.models.qwen3.config import padded_vocab_size

    tp = cfg.parallel.tp
    v_local = padded_vocab_size(hf.vocab_size, tp) // tp
    gathered = tokens * hf.hidden_size * p if cfg.parallel.sequence_parallel else 0
    return head_workspace_bytes(tokens, hf.hidden_size, v_local, cfg.model.head_chunk_tokens, p) + gathered


def head_workspace_bytes(tokens: int, hidden: int, v_local: int, chunk_tokens: int, p: int) -> int:
    """Peak bytes `fused_head_policy_loss` allocates over its forward and backward (on CUDA).

    What it holds at the peak, the end of a forward block (`megafork.ops.fused_policy`): the two
    [chunk, V/tp] fp32 blocks of logits and exponentials; for a half-precision model the bf16 copy
    of a block's logits gradient (the operand of the gradient products, `megafork.ops.head_gemm`);
    the [T, h] hidden gradient in the model dtype and the fp32 [V/tp, h] weight gradient, both held
    until the backward; and 32 bytes a token of per-token vectors. The backward allocates nothing
    more: it scales both in place, adds the weight gradient into main_grad and hands megatron's
    dummy gradient over the fp32 buffer's memory (`megafork.ops.weight_grad`). On CPU the op also
    holds an fp32 copy of a half-precision weight (no mixed-dtype products there).

    Args:
        tokens: rows of the micro-batch (T).
        hidden: h.
        v_local: the TP rank's vocab rows, padding included (padding rows count: an upper bound).
        chunk_tokens: `model.head_chunk_tokens` (0: the op's default, DEFAULT_CHUNK_ELEMENTS / V_local).
        p: bytes of the model dtype.
    """
    chunk = default_chunk(tokens, v_local, chunk_tokens or None)
    blocks = 2 * chunk * v_local * 4                      # logits and exponentials of one chunk, fp32
    operand = chunk * v_local * p if p < 4 else 0          # bf16 logits gradient of a chunk's rows
    dh = tokens * hidden * p                               # hidden gradient, held until the backward
    dw = v_local * hidden * 4                              # fp32 weight gradient, held until the backward
    return blocks + operand + dh + dw + tokens * 4 * 8     # + per-token vectors (logprob, entropy, row plan)


# Single changes, cheapest first (communication or compute they add).
_KNOBS = [
    ("optim.distributed_optimizer=true", lambda c: c.optim.distributed_optimizer is False,
     lambda c: dataclasses.replace(c.optim, distributed_optimizer=True), "optim"),
    ("parallel.sequence_parallel=true", lambda c: c.parallel.tp > 1 and not c.parallel.sequence_parallel,
     lambda c: dataclasses.replace(c.parallel, sequence_parallel=True), "parallel"),
    ("model.recompute=selective", lambda c: c.model.recompute == "none",
     lambda c: dataclasses.replace(c.model, recompute="selective"), "model"),
    ("model.recompute=selective model.recompute_modules=core_attn,mlp",
     lambda c: c.model.recompute != "full" and c.model.transformer_impl == "local",
     lambda c: dataclasses.replace(c.model, recompute="selective", recompute_modules=["core_attn", "mlp"]), "model"),
    ("model.recompute=full", lambda c: c.model.recompute != "full",
     lambda c: dataclasses.replace(c.model, recompute="full", recompute_modules=["core_attn"]), "model"),
    ("model.recompute_method=uniform model.recompute_num_layers=1",
     lambda c: c.model.recompute == "full" and (c.model.recompute_method, c.model.recompute_num_layers) != ("uniform", 1),
     lambda c: dataclasses.replace(c.model, recompute_method="uniform", recompute_num_layers=1), "model"),
]


def _cheapest_fixes(cfg, hf, plan: MemoryPlan, counts: list[int]) -> dict[int, str]:
    fixes = {}
    limit = plan.margin * plan.gpu_mem_gib
    failing = [s.stage for s in plan.stages if s.total_gib > limit]
    for name, applies, change, section in _KNOBS:
        if not failing or not applies(cfg):
            continue
        trial = dataclasses.replace(cfg, **{section: change(cfg)})
        other = plan_memory(trial, hf, plan.gpus, plan.gpu_mem_gib, plan.margin, counts, suggest=False)
        for s in list(failing):
            if other.stages[s].total_gib <= limit:
                fixes[s] = f"{name} ({other.stages[s].total_gib:.1f} GiB)"
                failing.remove(s)
    for s in failing:
        fixes[s] = "no single knob is enough: raise parallel.tp/pp, or lower train.micro_batch_size or the lengths"
    return fixes

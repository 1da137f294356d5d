"""Exact parameter counts per pipeline stage and TP rank, from the real megatron model on the meta device.

    counts = stage_param_counts(read_hf_config(hf_dir), tp=8, pp=2)   # [params of stage 0, stage 1] per GPU

Each stage is built as `megafork.models.qwen3.build_qwen3` builds it for training (same
TransformerConfig, layer spec and padded vocab), for one rank of a fake process group
(`megafork.distributed.init_fake_layout`) and under `torch.device("meta")`: shapes are exact and
nothing is allocated. Megatron shards every TP-split weight evenly (heads, ffn and the padded
vocab divide by TP, which `check_parallel_layout` enforces), so TP rank 0 speaks for its stage;
`tp_ranks="all"` builds every rank to show it.
"""
from __future__ import annotations

import torch


def stage_param_counts(hf, tp: int, pp: int, spec: str = "local", tp_ranks: str = "first") -> list[int]:
    """Parameters one GPU holds on each pipeline stage.

    Args:
        hf: `Qwen3HFConfig` (`read_hf_config`).
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        spec: "local" or "te" (the same parameter shapes; TE is not needed for "local").
        tp_ranks: "first" builds TP rank 0 of each stage; "all" builds every TP rank and raises if
            they differ.

    Returns:
        One count per stage (pp entries).
    """
    from megafork.distributed import ParallelConfig, destroy_distributed, init_fake_layout
    from megafork.models.qwen3 import Qwen3BuildOptions, build_qwen3

    opts = Qwen3BuildOptions(dtype="bf16", spec="local" if spec == "local" else "te", use_cpu_initialization=True,
                             perform_initialization=False)
    counts = []
    try:
        for stage in range(pp):
            seen = set()
            for tp_rank in range(tp if tp_ranks == "all" else 1):
                groups = init_fake_layout(ParallelConfig(tp=tp, pp=pp), rank=stage * tp + tp_rank)
                with torch.device("meta"):
                    model = build_qwen3(hf, opts, groups)
                seen.add(sum(p.numel() for p in model.parameters()))
                del model
            if len(seen) != 1:
                raise RuntimeError(f"stage {stage}: TP ranks hold different parameter counts {sorted(seen)}")
            counts.append(seen.pop())
    finally:
        destroy_distributed()
    return counts

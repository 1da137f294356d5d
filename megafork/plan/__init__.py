"""Memory planning: model shapes (a meta-device megatron build) + parallel layout + activation formulas.

`megafork plan` (megafork.plan.cli) prints the per-GPU plan of a training config; the pieces:
`params.stage_param_counts`, `activations.stage_bytes`, `memory.plan_memory`.
"""
from megafork.plan.memory import MemoryPlan, StagePlan, plan_memory

__all__ = ["MemoryPlan", "StagePlan", "plan_memory"]

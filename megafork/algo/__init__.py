"""RL maths as pure tensor functions: GRPO advantages, DAPO loss, rollout correction, overlong shaping,
dynamic sampling."""
from megafork.algo.advantages import grpo_advantages, token_advantages
from megafork.algo.loss import dapo_policy_loss, dapo_token_loss
from megafork.algo.rollout_correction import (
    CORRECTIONS,
    correction_metrics,
    correction_sums,
    rollout_correction,
)
from megafork.algo.shaping import expand_group_mask, informative_groups, overlong_penalty

__all__ = [
    "CORRECTIONS",
    "correction_metrics",
    "correction_sums",
    "dapo_policy_loss",
    "dapo_token_loss",
    "expand_group_mask",
    "grpo_advantages",
    "informative_groups",
    "overlong_penalty",
    "rollout_correction",
    "token_advantages",
]

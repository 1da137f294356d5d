"""The `algo` and `forking` config sections: the RL objective (DAPO with GRPO advantages, rollout
correction) and which response tokens get gradient. Loaded through `megafork.train.config`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megafork.algo.rollout_correction import check_correction
from megafork.train.config_types import ConfigError, _check_types, _positive, _require


@dataclass
class AlgoConfig:
    """DAPO with GRPO advantages (paper defaults).

    Attributes:
        n: responses per prompt (the GRPO group size).
        clip_low, clip_high: clip-higher epsilons: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_ratio_c: dual-clip bound for negative advantages.
        normalizer: "all_tokens" divides by every response token of the step (the paper's formula);
            "selected_tokens" by the selected tokens only (the released code's token-mean).
        adv_eps: epsilon in (r - mean) / (std + eps).
        overlong_shaping: apply DAPO's soft overlong penalty.
        overlong_buffer: tokens before `rollout.max_response_len` where the penalty ramps up.
        overlong_penalty: the penalty reached at the cap.
        dynamic_sampling: drop groups whose rewards are all equal and generate again.
        max_sampling_rounds: generation rounds per step before giving up (and logging the shortfall).
        oversample: prompts generated per round, as a multiple of `train.prompts_per_step`.
        rollout_correction: rollout–trainer mismatch correction (`megafork.algo.rollout_correction`):
            "none", "token_tis" (min(π_old/π_rollout, cap) per token), "seq_tis" (the product over
            the response, truncated) or "seq_mask" (sequences whose geometric-mean ratio leaves
            [rollout_mask_low, rollout_mask_high] are dropped; kept ones get token TIS).
        rollout_is_cap: truncation of the importance weights (verl/slime: 2.0).
        rollout_mask_low, rollout_mask_high: geometric-mean bounds of "seq_mask".
    """

    n: int = 16
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float = 10.0
    normalizer: Literal["all_tokens", "selected_tokens"] = "all_tokens"
    adv_eps: float = 1e-6
    overlong_shaping: bool = True
    overlong_buffer: int = 4096
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 10
    oversample: float = 3.0
    rollout_correction: Literal["none", "token_tis", "seq_tis", "seq_mask"] = "none"
    rollout_is_cap: float = 2.0
    rollout_mask_low: float = 0.999
    rollout_mask_high: float = 1.001

    def __post_init__(self):
        _check_types(self, "algo")
        try:
            check_correction(self.rollout_correction, self.rollout_is_cap, self.rollout_mask_low,
                             self.rollout_mask_high)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _require(self.n >= 2, "algo.n", "an integer >= 2 (GRPO needs a group)", self.n)
        _require(0.0 < self.clip_low < 1.0, "algo.clip_low", "a float in (0, 1)", self.clip_low)
        _positive(self, "algo", "clip_high", "adv_eps", "max_sampling_rounds", "oversample")
        _require(self.clip_ratio_c > 1.0, "algo.clip_ratio_c", "a float > 1", self.clip_ratio_c)
        _positive(self, "algo", "overlong_buffer", "overlong_penalty", allow_zero=True)
        _require(self.oversample >= 1.0, "algo.oversample", "a float >= 1", self.oversample)


@dataclass
class ForkingConfig:
    """Which response tokens get gradient.

    Attributes:
        ratio: fraction rho of response tokens kept (0.2 = the paper's top-20%).
        mode: "top" (highest entropy, the method), "bottom" (lowest, the paper's ablation),
            "random" (a ratio-sized random subset), "all" (plain DAPO; ratio unused).
        scope: the token set the threshold is taken over: "step" (all response tokens of the
            step on all DP x CP ranks, entropy from the old pass; the paper's formula),
            "minibatch", "microbatch", or "local" (the released code: per micro-batch and rank,
            exactly k tokens by torch.topk, entropy from the training forward pass).
    """

    ratio: float = 0.2
    mode: Literal["top", "bottom", "random", "all"] = "top"
    scope: Literal["step", "minibatch", "microbatch", "local"] = "step"

    def __post_init__(self):
        _check_types(self, "forking")
        _require(0.0 < self.ratio <= 1.0, "forking.ratio", "a float in (0, 1]", self.ratio)
        _require(self.scope != "local" or self.mode in ("top", "bottom"), "forking.mode",
                 "'top' or 'bottom' with scope 'local' (torch.topk per micro-batch)", self.mode)

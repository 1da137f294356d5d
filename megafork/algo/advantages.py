"""GRPO advantages: rewards normalised within each group of responses to the same prompt."""
from __future__ import annotations

import torch


def check_grouped(rewards: object, group_size: object, name: str = "rewards") -> torch.Tensor:
    """Validate 1-D finite float rewards in whole consecutive groups; return them as [G, group_size]."""
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, found {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [num_responses], found shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, found {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, found {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{name}: length {rewards.numel()} is not divisible by group_size {group_size}; "
                         "responses must come in whole consecutive groups")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name}: expected finite values, found {rewards[i].item()} at index {i} "
                         f"(group {i // group_size})")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> torch.Tensor:
    """Per-response GRPO advantages, `(r - mean_g) / (std_g + eps)`.

    Responses are grouped consecutively: responses `[g*group_size, (g+1)*group_size)` answer
    prompt g. `std_g` is the unbiased (Bessel-corrected, `torch.std` default) standard deviation,
    as in verl's GRPO and DAPO. A group whose rewards are all equal gets advantage 0 for every
    response (dynamic sampling normally removes such groups first).

    Args:
        rewards: 1-D float tensor [num_responses], finite.
        group_size: responses per prompt (>= 2: the unbiased std of one sample is undefined).
        eps: added to the std, > 0 keeps uniform groups at 0 instead of 0/0.
        scale_by_std: False gives `r - mean_g` (Dr. GRPO's variant without std normalisation).

    Returns:
        Tensor shaped and typed like `rewards`.

    Raises:
        ValueError: not 1-D, not floating point, non-finite values, a length not divisible by
            `group_size`, `group_size` < 2, or a negative `eps`.
    """
    grouped = check_grouped(rewards, group_size)
    if group_size < 2:
        raise ValueError(f"group_size: expected >= 2 (the unbiased std of one response is undefined), "
                         f"found {group_size}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, found {eps!r}")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-response advantages over tokens: `[B]` and `[B, T]` mask -> `[B, T]`, 0 off the mask.

    Args:
        advantages: 1-D float tensor [B].
        response_mask: bool tensor [B, T], true on response tokens.
    """
    if response_mask.dtype != torch.bool:
        raise ValueError(f"response_mask: expected dtype torch.bool, found {response_mask.dtype}")
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"advantages [B] and response_mask [B, T] expected, found {tuple(advantages.shape)} "
                         f"and {tuple(response_mask.shape)}")
    return advantages[:, None] * response_mask.to(advantages.dtype)

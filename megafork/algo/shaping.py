"""DAPO reward shaping: the overlong penalty and the dynamic-sampling group filter."""
from __future__ import annotations

import torch

from megafork.algo.advantages import check_grouped


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, linear over the last `buffer_length` tokens.

    For a response of L tokens: 0 if L <= max_length - buffer_length, otherwise
    `-penalty_factor * (L - (max_length - buffer_length)) / buffer_length`, clipped at
    `-penalty_factor` (reached at L = max_length).

    Args:
        lengths: 1-D integer tensor of response lengths (>= 0).
        max_length: maximum response length (DAPO: 20480).
        buffer_length: length of the penalty ramp, in (0, max_length] (DAPO: 4096).
        penalty_factor: penalty at the end of the ramp, >= 0 (DAPO: 1.0).

    Returns:
        float32 tensor shaped like `lengths`, in [-penalty_factor, 0]; add it to the rewards.
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        found = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths: expected a 1-D integer tensor, found {found}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"lengths: expected an integer dtype, found {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        i = int(torch.argmin(lengths))
        raise ValueError(f"lengths: expected >= 0, found {int(lengths[i])} at index {i}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int, found {max_length!r}")
    if isinstance(buffer_length, bool) or not isinstance(buffer_length, int) or not 0 < buffer_length <= max_length:
        raise ValueError(f"buffer_length: expected an int in (0, max_length={max_length}], found {buffer_length!r}")
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor: expected >= 0, found {penalty_factor!r}")
    start = max_length - buffer_length
    over = (lengths.to(torch.float64) - start).clamp(min=0.0, max=float(buffer_length))
    return (-penalty_factor * over / buffer_length).to(torch.float32)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic sampling: which prompt groups have rewards that are not all equal.

    A group whose responses all score the same has zero GRPO advantage and no gradient, so
    DAPO drops it and samples more prompts. Pass the verifier scores (accuracy), before
    overlong shaping: shaping can make equally wrong responses look different.

    Args:
        rewards: 1-D float tensor [num_groups * group_size], grouped consecutively.
        group_size: responses per prompt.

    Returns:
        bool tensor [num_groups], true where the group is informative.
    """
    grouped = check_grouped(rewards, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def expand_group_mask(group_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group bool mask [G] -> per-response mask [G * group_size] (consecutive groups)."""
    if group_mask.dtype != torch.bool or group_mask.dim() != 1:
        raise ValueError(f"group_mask: expected a 1-D bool tensor, found {group_mask.dtype} "
                         f"shape {tuple(group_mask.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, found {group_size!r}")
    return group_mask.repeat_interleave(group_size)

"""Rollout drift: how far the engine's log-probs are from the trainer's on the same tokens.

    drift = rollout_logprob_drift(batch.rollout_logprobs, old_logprobs, batch.response_mask, group=groups.dp_cp)

After a correct weight sync the two differ only by numerics (kernels, dtypes, batching), so
the mean |rollout - trainer| log-prob is small (about 1e-3 for bf16 engines, 1e-6 for fp32). A
jump means the engine serves different weights or samples from a different distribution.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rollout_logprob_drift(rollout_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                          mask: torch.Tensor | None = None, group: dist.ProcessGroup | None = None) -> float:
    """Mean |rollout log-prob - trainer log-prob| over the masked tokens of all ranks in `group`.

    Args:
        rollout_logprobs: [...] log-probs reported by the rollout engine.
        trainer_logprobs: same shape, computed by the trainer on the same tokens.
        mask: same shape; nonzero marks response tokens (default: all).
        group: reduce over this group (e.g. DP×CP); None on one process.

    Returns:
        The mean absolute difference (0.0 when there are no tokens anywhere).
    """
    if rollout_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(f"rollout_logprob_drift: rollout_logprobs has shape {list(rollout_logprobs.shape)} but "
                         f"trainer_logprobs has {list(trainer_logprobs.shape)}")
    if mask is None:
        mask = torch.ones_like(trainer_logprobs, dtype=torch.bool)
    if mask.shape != trainer_logprobs.shape:
        raise ValueError(f"rollout_logprob_drift: mask has shape {list(mask.shape)}, expected {list(trainer_logprobs.shape)}")
    diff = (rollout_logprobs.double() - trainer_logprobs.detach().double()).abs()
    sel = mask.bool()
    totals = torch.stack([diff[sel].sum(), sel.sum().double()]).to(trainer_logprobs.device)
    if group is not None:
        dist.all_reduce(totals, group=group)
    return float(totals[0] / totals[1]) if totals[1] > 0 else 0.0

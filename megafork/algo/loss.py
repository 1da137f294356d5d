"""DAPO clip-higher policy loss: per-token terms, the aggregated loss, and its metrics.

    from megafork.algo.loss import dapo_policy_loss
    loss, metrics = dapo_policy_loss(logprobs, old_logprobs, advantages, fork_mask,
                                     clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0,
                                     normalizer=global_response_tokens)

With r = exp(logprobs - old_logprobs) and A the advantage (already broadcast to every token),
the per-token loss is

    l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    l = min(l, -A clip_ratio_c)            only where A < 0, when clip_ratio_c is set (dual clip)
    loss = sum(w * l * loss_mask) / normalizer

where w is an optional detached per-token weight (`is_weights`, the rollout-mismatch importance
weight of `megafork.algo.rollout_correction`; 1 when not given).

`dapo_token_loss` returns l and dl/dlogprob elementwise. The fused LM head
(`megafork.ops.fused_head_policy_loss`) calls it to form its gradient in the forward pass, so
the autograd path here and the fused path share this one definition.

The normaliser is explicit so that the loss is a plain sum over tokens divided by a constant:
splitting a batch into micro-batches or DP ranks and summing their losses gives the same value
and gradient. Pass the global count the objective divides by (all response tokens of the
global batch for the paper's formula, selected tokens for the released code's token-mean).
"""
from __future__ import annotations

import math

import torch


def check_clip(clip_low: float, clip_high: float, clip_ratio_c: float | None) -> None:
    """Validate the clip settings, naming the offending field."""
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite float, found {value!r}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low: expected 0 <= clip_low < 1 (ratio floor 1 - clip_low > 0), found {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high: expected clip_high >= 0, found {clip_high}")
    if clip_ratio_c is not None:
        if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, (int, float)) \
                or not math.isfinite(clip_ratio_c) or clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c: expected None or a finite float > 1 (dual-clip bound), "
                             f"found {clip_ratio_c!r}")


def as_bool_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A bool view of a mask given as bool or as 0/1 numbers; anything else is an error."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, found {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name}: expected a bool (or 0/1) tensor, found dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected bool or 0/1 values, found {mask[bad].flatten()[0].item()!r}")
    return mask != 0


def check_token_tensors(shape: torch.Size, device: torch.device, floats: dict, masks: dict) -> dict:
    """Check per-token tensors share `shape` and `device`; returns the masks as bool tensors.

    Args:
        shape: the expected shape (one value per token).
        device: the expected device.
        floats: name -> tensor that must be floating point.
        masks: name -> bool or 0/1 tensor.
    """
    for name, t in {**floats, **masks}.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, found {type(t).__name__}")
        if name in floats and not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor, found dtype {t.dtype}")
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} (one value per token, advantages "
                             f"broadcast per token), found {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device}, found {t.device}")
    return {name: as_bool_mask(t, name) for name, t in masks.items()}


def resolve_normalizer(normalizer, mask: torch.Tensor):
    """The divisor of the summed token loss: explicit (> 0), or the local mask count (>= 1)."""
    if normalizer is None:
        return mask.sum().clamp_min(1).to(torch.float32)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer: expected a positive scalar, found a tensor of shape "
                             f"{tuple(normalizer.shape)} and dtype {normalizer.dtype}")
        value = float(normalizer)
    elif isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        value = float(normalizer)
    else:
        raise ValueError(f"normalizer: expected None or a positive number, found {type(normalizer).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normalizer: expected a finite count > 0 (the global number of tokens the "
                         f"loss averages over), found {value}")
    return normalizer.reshape(()).to(torch.float32) if isinstance(normalizer, torch.Tensor) else value


def dapo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token DAPO loss and its derivative w.r.t. `logprobs`, elementwise and unmasked.

    Args:
        logprobs: current log-probs of the sampled tokens.
        old_logprobs: log-probs under the policy that generated them.
        advantages: per-token advantages (same shape).
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_ratio_c: dual-clip bound for negative advantages; None disables it.

    Returns:
        (loss, dloss_dlogprob): both shaped like `logprobs`. Neither is differentiable through
        this function's own autograd if the inputs do not require grad; the derivative is the
        analytic one (-A r where the chosen branch depends on r, else 0).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    # The max picks the unclipped term (whose slope is -A r) unless clipping raised the loss;
    # where r is inside the clip range the two terms are equal and share that slope.
    active = unclipped >= clipped
    if clip_ratio_c is not None:
        dual = -advantages * clip_ratio_c
        dual_on = (advantages < 0) & (dual < loss)
        loss = torch.where(dual_on, dual, loss)
        active = active & ~dual_on
    grad = torch.where(active, unclipped, torch.zeros_like(unclipped))
    return loss, grad


@torch.no_grad()
def dapo_metrics(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, clip_ratio_c,
                 entropy=None, response_mask=None) -> dict[str, torch.Tensor]:
    """Detached diagnostics over the masked tokens (local means; `num_tokens` to re-weight)."""
    count = mask.sum()
    denom = count.clamp_min(1).to(torch.float32)

    def mean(x, m=mask, d=denom):
        return torch.where(m, x, torch.zeros_like(x)).sum().to(torch.float32) / d

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    metrics = {
        "clipfrac_low": mean(((advantages < 0) & (ratio < 1.0 - clip_low)).float()),
        "clipfrac_high": mean(((advantages > 0) & (ratio > 1.0 + clip_high)).float()),
        # k1 estimate of KL(old || new) on samples from the old policy, and the k3 estimate.
        "approx_kl": mean(-log_ratio),
        "approx_kl_k3": mean(ratio - 1.0 - log_ratio),
        "num_tokens": count.to(torch.float32),
    }
    if clip_ratio_c is not None:
        metrics["clipfrac_dual"] = mean(((advantages < 0) & (ratio > clip_ratio_c)).float())
    if entropy is not None:
        metrics["entropy_selected"] = mean(entropy.detach())
        if response_mask is not None:
            metrics["entropy_all"] = mean(entropy.detach(), response_mask,
                                          response_mask.sum().clamp_min(1).to(torch.float32))
    return metrics


def dapo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    *,
    entropy: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO clip-higher loss summed over `loss_mask` tokens and divided by `normalizer`.

    Args:
        logprobs: [...] current log-probs (differentiable).
        old_logprobs: [...] log-probs of the rollout/old policy.
        advantages: [...] per-token advantages.
        loss_mask: [...] bool (or 0/1) mask of the tokens that carry loss, e.g. forking tokens.
        clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high] (DAPO: 0.2, 0.28).
        clip_ratio_c: dual-clip bound (> 1) for negative advantages; None disables it.
        normalizer: the global token count the loss is divided by (a number or a scalar
            tensor, > 0). None: the local `loss_mask.sum()` (at least 1), for one process only.
        entropy: optional [...] per-token entropy, for the `entropy_selected` metric.
        response_mask: optional [...] mask of all response tokens, for `entropy_all`; needs
            `entropy`.
        is_weights: optional [...] detached weights multiplying each token's loss (and so its
            gradient): the rollout-correction weights; None means 1.

    Returns:
        (loss, metrics): a scalar loss, and detached scalars `clipfrac_low`, `clipfrac_high`,
        (`clipfrac_dual` with clip_ratio_c), `approx_kl`, `approx_kl_k3`, `num_tokens`, and
        `entropy_selected` / `entropy_all` when entropy is given. Means are over the local
        masked tokens; weight them by `num_tokens` to combine micro-batches.

    Raises:
        ValueError: mismatched shapes/devices, non-float inputs, a mask that is not 0/1, bad clip
            values, a non-positive normalizer, or a response_mask without entropy.
    """
    if response_mask is not None and entropy is None:
        raise ValueError("response_mask: only used for the entropy_all metric, which needs `entropy`; "
                         "found response_mask without entropy")
    if not isinstance(logprobs, torch.Tensor):
        raise ValueError(f"logprobs: expected a tensor, found {type(logprobs).__name__}")
    floats = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
    if entropy is not None:
        floats["entropy"] = entropy
    if is_weights is not None:
        floats["is_weights"] = is_weights
    masks = {"loss_mask": loss_mask}
    if response_mask is not None:
        masks["response_mask"] = response_mask
    masks = check_token_tensors(logprobs.shape, logprobs.device, floats, masks)
    mask, response = masks["loss_mask"], masks.get("response_mask")
    check_clip(clip_low, clip_high, clip_ratio_c)
    norm = resolve_normalizer(normalizer, mask)
    token_loss, _ = dapo_token_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, clip_ratio_c)
    if is_weights is not None:
        token_loss = token_loss * is_weights.detach().to(token_loss.dtype)
    loss = torch.where(mask, token_loss, torch.zeros_like(token_loss)).sum() / norm
    metrics = dapo_metrics(logprobs.detach(), old_logprobs, advantages, mask, clip_low, clip_high,
                           clip_ratio_c, entropy, response)
    return loss, metrics

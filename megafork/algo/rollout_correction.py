"""Rollout–trainer mismatch correction: truncated importance sampling (TIS) and sequence masking.

    corr = rollout_correction(old_logprobs, rollout_logprobs, response_mask, "token_tis", cap=2.0)
    loss, _ = dapo_policy_loss(logprobs, old_logprobs, adv, fork_mask & corr.keep, is_weights=corr.weights, ...)

The rollout engine (SGLang, bf16 kernels) and the trainer (Megatron) give the same sampled
token different log-probs, and with `train.rollout_ahead: 1` the engine also samples with
weights one step older. The DAPO ratio is taken against the trainer's own π_old (the old pass),
so the samples come from π_rollout while the objective assumes π_old: the policy gradient is
biased. Each token's loss is multiplied by a detached importance weight built from

    ρ_t = π_old(y_t) / π_rollout(y_t) = exp(old_logprob_t - rollout_logprob_t)

on the same sampled tokens. The definitions are verl's "decoupled" rollout correction
(`algorithm.rollout_correction`, docs/algo/rollout_corr.md: the IS weight is π_old/π_rollout,
truncated at an upper threshold, detached, applied to the PPO loss), which for the token mode is
also slime's `--use-tis --tis-clip`:

* ``token_tis``: w_t = min(ρ_t, cap) (verl `rollout_is="token"`, slime TIS).
* ``seq_tis``: w = min(Π_t ρ_t, cap), the product over all response tokens of the sequence,
  the same w for each of its tokens (verl `rollout_is="sequence"`). Computed as
  exp(min(Σ log ρ_t, log cap)) so long responses cannot overflow.
* ``seq_mask``: the sequence's geometric mean exp(mean_t log ρ_t) must lie in
  [mask_low, mask_high], else the whole sequence leaves the loss *and* its normaliser (verl's
  geometric rejection sampling `rollout_rs="geometric"`, which edits the response mask rather
  than the weights; NeMo-RL's seq-mask-tis); kept sequences get token TIS, min(ρ_t, cap). The
  geometric mean, unlike the product, does not shrink or grow with length, so one pair of
  bounds serves short and long responses.

Why verl's definitions: they are the ones written down with their derivation (the decoupled
three-policy PPO of the rollout_corr math doc), they name both the token/sequence trade-off
and rejection, and their cap default (2.0) is the one slime, verl and NeMo-RL share.

Forking tokens: the products and means run over *every* response token of the sequence (the
engine sampled the whole response, so the likelihood ratio of the sample is over all of it);
the weights then multiply the loss only where the loss lives, on the selected tokens. A
sequence is one row of the `[b, s]` micro-batch tensors; with `rollout_logprobs` equal to
`old_logprobs` every weight is exactly 1.0 and no sequence is masked, so every mode equals
``none`` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CORRECTIONS = ("none", "token_tis", "seq_tis", "seq_mask")


def check_correction(mode: str, cap: float, mask_low: float, mask_high: float, prefix: str = "algo.") -> None:
    """Validate the correction settings, naming the offending key.

    Args:
        mode: one of `CORRECTIONS`.
        cap: truncation of the weights (> 0; 2.0 in verl/slime).
        mask_low, mask_high: bounds of the geometric-mean ratio kept by ``seq_mask``
            (0 < low <= 1 <= high, so that a matched engine never masks).
        prefix: the config section the keys live in, for messages.
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"{prefix}rollout_correction: expected one of {list(CORRECTIONS)}, found {mode!r}")
    for name, value in (("rollout_is_cap", cap), ("rollout_mask_low", mask_low), ("rollout_mask_high", mask_high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{prefix}{name}: expected a finite float > 0, found {value!r}")
    # An engine that matches the trainer (every ratio 1) must keep every sequence.
    if mask_low > 1.0:
        raise ValueError(f"{prefix}rollout_mask_low: expected a value <= 1, found {mask_low}")
    if mask_high < 1.0:
        raise ValueError(f"{prefix}rollout_mask_high: expected a value >= 1, found {mask_high}")


@dataclass
class Correction:
    """The result of `rollout_correction`, shaped like the inputs ([..., s], one row a sequence).

    Attributes:
        weights: detached float32 per-token weights (1 outside the response), or None for "none".
        keep: bool, the response tokens of sequences that stay in the loss and its normaliser.
        raw: detached untruncated per-token weights (ρ_t, or the sequence product for seq_tis),
            for the truncation statistic.
    """

    weights: torch.Tensor | None
    keep: torch.Tensor
    raw: torch.Tensor | None


@torch.no_grad()
def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor,
                       mode: str, cap: float = 2.0, mask_low: float = 0.999, mask_high: float = 1.001) -> Correction:
    """Per-token importance weights and the kept-sequence mask for one batch of sequences.

    Args:
        old_logprobs: [..., s] the trainer's log-probs of the sampled tokens before the update.
        rollout_logprobs: [..., s] the engine's log-probs of the same tokens.
        response_mask: [..., s] bool, the response tokens (each row along the last dim is one
            sequence; positions outside the mask are ignored).
        mode: "none" | "token_tis" | "seq_tis" | "seq_mask" (see the module docstring).
        cap: upper truncation of the weights.
        mask_low, mask_high: geometric-mean bounds for "seq_mask".

    Returns:
        A `Correction`; all tensors detached.

    Raises:
        ValueError: bad settings, or inputs of different shapes.
    """
    check_correction(mode, cap, mask_low, mask_high)
    for name, t in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if t.shape != response_mask.shape:
            raise ValueError(f"rollout_correction: {name} has shape {tuple(t.shape)}, expected the response mask's "
                             f"{tuple(response_mask.shape)}")
    resp = response_mask.bool()
    if mode == "none":
        return Correction(None, resp, None)
    log_ratio = torch.where(resp, old_logprobs.float() - rollout_logprobs.float(), torch.zeros_like(old_logprobs,
                                                                                                    dtype=torch.float32))
    log_cap = math.log(cap)
    one = torch.ones_like(log_ratio)
    keep = resp
    if mode == "seq_tis":
        seq = log_ratio.sum(-1, keepdim=True)  # log of the product over the response
        raw = torch.where(resp, seq.exp().expand_as(log_ratio), one)
        weights = torch.where(resp, seq.clamp(max=log_cap).exp().expand_as(log_ratio), one)
        return Correction(weights, keep, raw)
    raw = torch.where(resp, log_ratio.exp(), one)
    weights = torch.where(resp, log_ratio.clamp(max=log_cap).exp(), one)
    if mode == "seq_mask":
        n = resp.sum(-1, keepdim=True)
        geo = (log_ratio.sum(-1, keepdim=True) / n.clamp_min(1)).exp()
        keep = resp & (geo >= mask_low) & (geo <= mask_high)
    return Correction(weights, keep, raw)


@torch.no_grad()
def correction_sums(corr: Correction, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                    response_mask: torch.Tensor, loss_mask: torch.Tensor, cap: float) -> dict[str, float]:
    """Summable statistics of one batch; `correction_metrics` turns their global sums into metrics.

    Args:
        corr: the batch's correction.
        old_logprobs, rollout_logprobs, response_mask: as for `rollout_correction`.
        loss_mask: [..., s] the tokens that carry loss before the correction (the forking tokens).
        cap: the truncation the weights used.

    Returns:
        Sums (floats): `mismatch_k3_sum` and `mismatch_tokens` over response tokens (k3 estimate
        of KL(π_rollout || π_old): ρ - 1 - log ρ on the engine's samples), `is_weight_sum`,
        `is_weight_max`, `is_truncated` and `is_tokens` over the loss tokens that stay in the
        loss, `sequences` and `sequences_masked` (rows with response tokens).
    """
    resp = response_mask.bool()
    log_ratio = (old_logprobs.double() - rollout_logprobs.double())[resp]
    k3 = log_ratio.exp() - 1.0 - log_ratio
    kept = loss_mask.bool() & resp & corr.keep
    has_resp = resp.any(-1)
    masked = has_resp & ~corr.keep.any(-1)
    if corr.weights is None:
        w = torch.ones(int(kept.sum()), dtype=torch.float64)
        truncated = 0.0
    else:
        w = corr.weights[kept].double()
        truncated = float((corr.raw[kept] > cap).sum())
    return {
        "mismatch_k3_sum": float(k3.sum()), "mismatch_tokens": float(resp.sum()),
        "is_weight_sum": float(w.sum()), "is_weight_max": float(w.max()) if w.numel() else 0.0,
        "is_truncated": truncated, "is_tokens": float(kept.sum()),
        "sequences": float(has_resp.sum()), "sequences_masked": float(masked.sum()),
    }


def correction_metrics(sums: dict[str, float]) -> dict[str, float]:
    """metrics.jsonl entries from `correction_sums` summed over the step (is_weight_max: a max)."""
    tokens = max(sums["is_tokens"], 1.0)
    return {
        "mismatch_kl": sums["mismatch_k3_sum"] / max(sums["mismatch_tokens"], 1.0),
        "is_weight_mean": sums["is_weight_sum"] / tokens,
        "is_weight_max": sums["is_weight_max"],
        "is_truncated_fraction": sums["is_truncated"] / tokens,
        "is_masked_fraction": sums["sequences_masked"] / max(sums["sequences"], 1.0),
    }

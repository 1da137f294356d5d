"""Rollout correction (algo.rollout_correction): weights, the fused head and pipeline.py against float64.

    .venv/bin/python -m pytest tests/test_rollout_correction.py -q

* The weights of every mode against a per-sequence float64 reference written from the
  definitions (token ratio, product over the response, geometric-mean mask).
* `fused_head_policy_loss(..., is_weights=w)` and `pipeline.policy_loss_func` with every mode:
  loss and gradients (hidden and LM-head weight) against float64 autograd of
  Σ w_t · l_t(DAPO clip-higher, dual clip) over the forking tokens / the normaliser, written
  out here independently of megafork's loss code.
* Rollout log-probs equal to the trainer's: every mode gives the loss and gradients of "none"
  bit for bit.
* The step's metrics (mismatch_kl as k3, weight mean/max, truncated and masked fractions) and
  the config errors.
"""
from __future__ import annotations

import math

import pytest
import torch

from megafork.algo.rollout_correction import (
    CORRECTIONS,
    check_correction,
    correction_metrics,
    correction_sums,
    rollout_correction,
)
from megafork.ops import fused_head_policy_loss
from megafork.pipeline import PolicyLossConfig, policy_loss_func
from megafork.train.batch import MicroBatch
from megafork.train.config import load_config
from megafork.train.config_types import ConfigError

V, H, B, S = 29, 12, 4, 10
CAP, LOW, HIGH = 2.0, 0.9, 1.1
CLIP = dict(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
ROWS = [(1, 7), (3, 6), (0, 9), (2, 5)]  # (first label position, response length) per sequence


def _reference_weights(old, rollout, resp, mode):
    """float64 weights and kept-token mask from the definitions, one sequence (row) at a time."""
    w = torch.ones(old.shape, dtype=torch.float64)
    keep = resp.clone()
    for r in range(old.shape[0]):
        idx = resp[r].nonzero().flatten().tolist()
        ratios = [math.exp(float(old[r, i]) - float(rollout[r, i])) for i in idx]
        if mode == "token_tis" or mode == "seq_mask":
            for i, rho in zip(idx, ratios):
                w[r, i] = min(rho, CAP)
        if mode == "seq_tis":
            prod = math.prod(ratios)
            for i in idx:
                w[r, i] = min(prod, CAP)
        if mode == "seq_mask":
            geo = math.prod(ratios) ** (1.0 / len(ratios))
            if not LOW <= geo <= HIGH:
                keep[r] = False
    return w, keep


def _case(seed=0):
    """Logits inputs and a batch whose rollout log-probs straddle the cap and the mask bounds."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g)
    weight = 0.6 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    resp = torch.zeros(B, S, dtype=torch.bool)
    for r, (a, n) in enumerate(ROWS):
        resp[r, a:a + n] = True
    adv = torch.tensor([1.0, -0.8, 0.5, -1.2]).unsqueeze(1).expand(B, S) * resp
    lp = _ref_logprobs(hidden, weight, labels)[0].detach()
    old = (lp + 0.5 * torch.randn(B, S, generator=g, dtype=torch.float64)).float() * resp
    old[1, 3] = float(lp[1, 3]) - 2.0  # ratio e^2 > clip_ratio_c on a selected token with A < 0: the dual clip
    # Row 0: small gaps (geometric mean near 1: kept by seq_mask); the others: large gaps, and
    # row 3 gets tokens whose token ratio exceeds the cap.
    noise = torch.randn(B, S, generator=g)
    scale = torch.tensor([0.01, 0.6, 0.4, 0.9]).unsqueeze(1)
    rollout = (old - scale * noise) * resp
    rollout[3] = torch.where(resp[3], old[3] - 1.0, rollout[3])  # ρ = e > cap on every token of row 3
    fork = (torch.rand(B, S, generator=g) < 0.45) & resp
    fork[0, 1] = fork[1, 3] = True
    batch = MicroBatch(tokens=labels.clone(), position_ids=torch.arange(S).expand(B, S), labels=labels,
                       response_mask=resp, advantages=adv.contiguous(), rollout_logprobs=rollout.contiguous(),
                       old_logprobs=old.contiguous(), fork_mask=fork)
    return hidden, weight, batch


def _ref_logprobs(hidden, weight, labels):
    h = hidden.double().transpose(0, 1).requires_grad_()
    w = weight.double().requires_grad_()
    logp = torch.log_softmax(h @ w.T, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), h, w


def _ref_dapo(lp, old, adv):
    """Per-token DAPO clip-higher with the dual clip, float64, written from the formula."""
    r = torch.exp(lp - old.double())
    a = adv.double()
    loss = torch.maximum(-a * r, -a * r.clamp(1 - CLIP["clip_low"], 1 + CLIP["clip_high"]))
    return torch.where(a < 0, torch.minimum(loss, -a * CLIP["clip_ratio_c"]), loss)


def _reference_step(hidden, weight, batch, mode, normalizer):
    """(loss, d/dhidden [s, b, h], d/dW, kept mask): float64 autograd of Σ w l over kept forking tokens / n."""
    w_ref, keep = _reference_weights(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask, mode)
    lp, h, w = _ref_logprobs(hidden, weight, batch.labels)
    mask = batch.fork_mask & keep
    n = float(keep.sum()) if normalizer == "all_tokens" else float(mask.sum())
    loss = (w_ref * _ref_dapo(lp, batch.old_logprobs, batch.advantages) * mask).sum() / n
    loss.backward()
    return loss.detach(), h.grad.transpose(0, 1), w.grad, keep


def _close(got, want, tol=2e-5):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)) < tol


@pytest.mark.parametrize("mode", CORRECTIONS)
def test_weights_match_the_definitions(mode):
    _, _, b = _case()
    corr = rollout_correction(b.old_logprobs, b.rollout_logprobs, b.response_mask, mode, CAP, LOW, HIGH)
    want_w, want_keep = _reference_weights(b.old_logprobs, b.rollout_logprobs, b.response_mask, mode)
    assert torch.equal(corr.keep, want_keep)
    if mode == "none":
        assert corr.weights is None
        return
    assert not corr.weights.requires_grad
    assert _close(corr.weights[b.response_mask], want_w[b.response_mask], 1e-5)
    assert bool((corr.weights[b.response_mask] <= CAP).all())
    assert bool((corr.weights[b.response_mask] < CAP).any()), "the case should leave some weights untruncated"
    if mode == "seq_mask":  # the case must exercise the mask both ways
        assert bool(corr.keep[0].any()) and not bool(corr.keep[3].any())


@pytest.mark.parametrize("mode", CORRECTIONS)
def test_fused_head_weighted_loss_and_gradients(mode):
    hidden, weight, b = _case(1)
    corr = rollout_correction(b.old_logprobs, b.rollout_logprobs, b.response_mask, mode, CAP, LOW, HIGH)
    n_keep = float(corr.keep.sum())
    want_loss, want_dh, want_dw, _ = _reference_step(hidden, weight, b, mode, "all_tokens")
    h = hidden.transpose(0, 1).reshape(-1, H).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, _ = fused_head_policy_loss(
        h, w, b.labels.reshape(-1), b.old_logprobs.reshape(-1), b.advantages.reshape(-1),
        (b.fork_mask & corr.keep).reshape(-1), chunk_size=7, normalizer=n_keep,
        is_weights=None if corr.weights is None else corr.weights.reshape(-1), **CLIP)
    loss.backward()
    assert abs(float(loss.detach()) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert _close(h.grad.view(B, S, H).transpose(0, 1), want_dh) and _close(w.grad, want_dw)
    # The dual clip is active on some selected, kept token of the case (its gradient is zero there).
    r = torch.exp(_ref_logprobs(hidden, weight, b.labels)[0].detach() - b.old_logprobs.double())
    assert bool(((b.advantages < 0) & (r > CLIP["clip_ratio_c"]) & b.fork_mask & corr.keep).any())


@pytest.mark.parametrize("normalizer", ["all_tokens", "selected_tokens"])
@pytest.mark.parametrize("mode", CORRECTIONS)
def test_pipeline_loss_func_weighted(mode, normalizer):
    hidden, weight, b = _case(2)
    cfg = PolicyLossConfig(normalizer=normalizer, rollout_correction=mode, rollout_is_cap=CAP,
                           rollout_mask_low=LOW, rollout_mask_high=HIGH, chunk_size=5, **CLIP)
    want_loss, want_dh, want_dw, keep = _reference_step(hidden, weight, b, mode, normalizer)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count, m = policy_loss_func(cfg, None, V, b, _Head(w), h)
    loss.backward()
    n = float(count)
    want_n = float(keep.sum()) if normalizer == "all_tokens" else float((b.fork_mask & keep).sum())
    assert n == want_n, "masked sequences must leave the token count megatron divides by"
    assert float(m["response_tokens"]) == float(b.response_mask.sum())
    assert abs(float(loss.detach()) / n - float(want_loss)) < 1e-5 * abs(float(want_loss))
    assert _close(h.grad / n, want_dh) and _close(w.grad / n, want_dw)


class _Head:
    def __init__(self, weight):
        self.weight = weight

    def output_weight(self):
        return self.weight


@pytest.mark.parametrize("mode", CORRECTIONS[1:])
def test_matched_engine_equals_none_exactly(mode):
    hidden, weight, b = _case(3)
    b.rollout_logprobs = b.old_logprobs.clone()
    outs = {}
    for m in ("none", mode):
        cfg = PolicyLossConfig(rollout_correction=m, rollout_is_cap=CAP, rollout_mask_low=LOW,
                               rollout_mask_high=HIGH, **CLIP)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, count, _ = policy_loss_func(cfg, None, V, b, _Head(w), h)
        loss.backward()
        outs[m] = (loss.detach(), count, h.grad, w.grad)
    for got, want in zip(outs[mode], outs["none"], strict=True):
        assert torch.equal(got, want)
    # The fused head itself: weights of exactly 1 change nothing.
    corr = rollout_correction(b.old_logprobs, b.rollout_logprobs, b.response_mask, mode, CAP, LOW, HIGH)
    assert bool((corr.weights == 1.0).all()) and torch.equal(corr.keep, b.response_mask)
    args = (hidden.transpose(0, 1).reshape(-1, H), weight, b.labels.reshape(-1), b.old_logprobs.reshape(-1),
            b.advantages.reshape(-1), b.fork_mask.reshape(-1))
    res = []
    for wts in (None, corr.weights.reshape(-1)):
        h, w = args[0].clone().requires_grad_(), args[1].clone().requires_grad_()
        loss, _ = fused_head_policy_loss(h, w, *args[2:], is_weights=wts, normalizer=31.0, **CLIP)
        loss.backward()
        res.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(res[1], res[0], strict=True):
        assert torch.equal(got, want)


def test_metrics():
    _, _, b = _case()
    corr = rollout_correction(b.old_logprobs, b.rollout_logprobs, b.response_mask, "seq_mask", CAP, LOW, HIGH)
    m = correction_metrics(correction_sums(corr, b.old_logprobs, b.rollout_logprobs, b.response_mask,
                                           b.fork_mask, CAP))
    resp = b.response_mask
    lr = (b.old_logprobs.double() - b.rollout_logprobs.double())[resp]
    assert abs(m["mismatch_kl"] - float((lr.exp() - 1 - lr).mean())) < 1e-12
    want_w, keep = _reference_weights(b.old_logprobs, b.rollout_logprobs, resp, "seq_mask")
    sel = b.fork_mask & keep
    raw = (b.old_logprobs.double() - b.rollout_logprobs.double()).exp()[sel]
    assert abs(m["is_weight_mean"] - float(want_w[sel].mean())) < 1e-6
    assert abs(m["is_weight_max"] - float(want_w[sel].max())) < 1e-6
    assert m["is_truncated_fraction"] == float((raw > CAP).float().mean())
    assert m["is_masked_fraction"] == float((~keep.any(-1)).sum()) / B > 0
    none = correction_metrics(correction_sums(rollout_correction(b.old_logprobs, b.rollout_logprobs, resp, "none"),
                                              b.old_logprobs, b.rollout_logprobs, resp, b.fork_mask, CAP))
    assert none["is_weight_mean"] == none["is_weight_max"] == 1.0
    assert none["is_truncated_fraction"] == none["is_masked_fraction"] == 0.0
    assert none["mismatch_kl"] == m["mismatch_kl"]


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="algo.rollout_correction"):
        check_correction("tis", 2.0, 0.9, 1.1)
    with pytest.raises(ValueError, match="algo.rollout_is_cap"):
        check_correction("token_tis", 0.0, 0.9, 1.1)
    with pytest.raises(ValueError, match="rollout_mask_low"):
        check_correction("seq_mask", 2.0, 1.01, 1.1)
    with pytest.raises(ValueError, match="micro-batch.rollout_logprobs"):
        _, _, b = _case()
        b.rollout_logprobs = None
        policy_loss_func(PolicyLossConfig(rollout_correction="token_tis"), None, V, b, _Head(torch.zeros(V, H)),
                         torch.zeros(S, B, H))
    with pytest.raises(ConfigError, match="algo.rollout_correction"):
        load_config(None, ["algo.rollout_correction=seq"])
    with pytest.raises(ConfigError, match="algo.rollout_mask_high"):
        load_config(None, ["algo.rollout_correction=seq_mask", "algo.rollout_mask_high=0.5"])

"""DAPO loss: the piecewise formula, its analytic derivative, the normaliser, metrics, bad input.

Includes invariance of loss and gradient to the micro-batch split and, on 2 gloo ranks, to the
DP split, given a global normaliser.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megafork.algo.loss import dapo_policy_loss, dapo_token_loss
from megafork.testing.multirank import run_ranks


def _piecewise(lp, old, adv, lo, hi, c):
    """The DAPO token loss written case by case, in float64 Python."""
    out = []
    for x, o, a in zip(lp.tolist(), old.tolist(), adv.tolist()):
        r = torch.tensor(x - o, dtype=torch.float64).exp().item()
        if a >= 0:
            val = -a * min(r, 1 + hi)  # clipped above, never below
        else:
            val = -a * max(r, 1 - lo)  # clipped below, never above
            if c is not None:
                val = min(val, -a * c)
        out.append(val)
    return torch.tensor(out, dtype=torch.float64)


def _batch(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(n, generator=g, dtype=torch.float64) - 3).requires_grad_()
    old = lp.detach() + torch.randn(n, generator=g, dtype=torch.float64) * 0.8  # ratios far outside the clip
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[::17] = 0.0
    mask = torch.rand(n, generator=g) < 0.6
    return lp, old, adv, mask


@pytest.mark.parametrize("c", [None, 3.0])
def test_token_loss_formula_and_derivative(c):
    lp, old, adv, _ = _batch()
    loss, grad = dapo_token_loss(lp, old, adv, 0.2, 0.28, c)
    torch.testing.assert_close(loss.detach(), _piecewise(lp, old, adv, 0.2, 0.28, c))
    (auto,) = torch.autograd.grad(loss.sum(), lp)
    torch.testing.assert_close(grad.detach(), auto)
    r = torch.exp(lp.detach() - old)
    clipped_high = (adv > 0) & (r > 1.28)
    assert clipped_high.any() and (grad[clipped_high] == 0).all()
    if c is not None:
        dual = (adv < 0) & (r > c)
        assert dual.any() and (grad[dual] == 0).all()


def test_policy_loss_normaliser_and_metrics():
    lp, old, adv, mask = _batch(seed=1)
    entropy = torch.rand(lp.shape, dtype=torch.float64)
    response = torch.rand(lp.shape) < 0.9
    tok = _piecewise(lp, old, adv, 0.2, 0.28, 10.0)
    loss, m = dapo_policy_loss(lp, old, adv, mask, clip_ratio_c=10.0, entropy=entropy, response_mask=response)
    n = int(mask.sum())
    torch.testing.assert_close(loss.detach(), tok[mask].sum() / n)
    loss_global, _ = dapo_policy_loss(lp, old, adv, mask, clip_ratio_c=10.0, normalizer=torch.tensor(1000))
    torch.testing.assert_close(loss_global.detach(), tok[mask].sum() / 1000)
    r = torch.exp(lp.detach() - old)[mask]
    a = adv[mask]
    torch.testing.assert_close(m["clipfrac_low"], ((a < 0) & (r < 0.8)).float().mean())
    torch.testing.assert_close(m["clipfrac_high"], ((a > 0) & (r > 1.28)).float().mean())
    torch.testing.assert_close(m["clipfrac_dual"], ((a < 0) & (r > 10.0)).float().mean())
    assert 0 < m["clipfrac_low"] < 1 and 0 < m["clipfrac_high"] < 1
    torch.testing.assert_close(m["approx_kl"], (-r.log()).mean().float())
    torch.testing.assert_close(m["approx_kl_k3"], (r - 1 - r.log()).mean().float())
    torch.testing.assert_close(m["entropy_selected"], entropy[mask].mean().float())
    torch.testing.assert_close(m["entropy_all"], entropy[response].mean().float())
    assert m["num_tokens"].item() == n


def test_empty_mask_local_normaliser_gives_zero():
    lp, old, adv, _ = _batch(seed=2)
    loss, m = dapo_policy_loss(lp, old, adv, torch.zeros(lp.shape, dtype=torch.bool))
    assert loss.item() == 0.0 and m["num_tokens"].item() == 0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_microbatch_split_invariance():
    lp, old, adv, mask = _batch(seed=3)
    norm = int(mask.sum())
    full, _ = dapo_policy_loss(lp, old, adv, mask, normalizer=norm)
    (g_full,) = torch.autograd.grad(full, lp)
    parts = [slice(0, 13), slice(13, 120), slice(120, 200)]
    total = sum(dapo_policy_loss(lp[s], old[s], adv[s], mask[s], normalizer=norm)[0] for s in parts)
    (g_split,) = torch.autograd.grad(total, lp)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_split, g_full)


def _dp_rank(rank, world):
    lp, old, adv, mask = _batch(seed=4)
    norm = int(mask.sum())  # the global count, known to every rank
    full, _ = dapo_policy_loss(lp, old, adv, mask, normalizer=norm)
    (g_full,) = torch.autograd.grad(full, lp)
    # Uneven DP split: rank 0 takes 70 tokens, rank 1 the other 130.
    mine = slice(0, 70) if rank == 0 else slice(70, 200)
    leaf = lp.detach()[mine].clone().requires_grad_()
    loss, _ = dapo_policy_loss(leaf, old[mine], adv[mine], mask[mine], normalizer=norm)
    loss.backward()
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    grads = torch.zeros_like(lp)
    grads[mine] = leaf.grad
    dist.all_reduce(grads)
    torch.testing.assert_close(summed, full.detach(), msg=lambda m: f"rank {rank}: DP-summed loss: {m}")
    torch.testing.assert_close(grads, g_full, msg=lambda m: f"rank {rank}: DP-summed grad: {m}")
    return float(summed)


def test_dp_split_invariance_on_two_ranks():
    out = run_ranks(_dp_rank, 2, timeout=120)
    assert out[0] == out[1] != 0.0


@pytest.mark.parametrize("change, match", [
    (dict(old_logprobs=torch.zeros(3)), r"old_logprobs: expected shape \(4,\).*found \(3,\)"),
    (dict(advantages=torch.zeros(4, dtype=torch.int64)), r"advantages: expected a floating tensor, found dtype torch.int64"),
    (dict(loss_mask=torch.tensor([0.0, 1.0, 2.0, 1.0])), r"loss_mask: expected bool or 0/1 values, found 2.0"),
    (dict(clip_low=-0.1), r"clip_low: expected 0 <= clip_low < 1.*found -0.1"),
    (dict(clip_high=-1.0), r"clip_high: expected clip_high >= 0, found -1.0"),
    (dict(clip_ratio_c=0.9), r"clip_ratio_c: expected None or a finite float > 1.*0.9"),
    (dict(normalizer=-3), r"normalizer: expected a finite count > 0.*found -3.0"),
    (dict(normalizer=torch.ones(2)), r"normalizer: expected a positive scalar, found a tensor of shape \(2,\)"),
    (dict(normalizer="all"), r"normalizer: expected None or a positive number, found str"),
    (dict(response_mask=torch.ones(4, dtype=torch.bool)), r"response_mask: .*found response_mask without entropy"),
    (dict(entropy=torch.zeros(5)), r"entropy: expected shape \(4,\).*found \(5,\)"),
])
def test_bad_input_names_the_field(change, match):
    args = dict(logprobs=torch.zeros(4), old_logprobs=torch.zeros(4), advantages=torch.zeros(4),
                loss_mask=torch.ones(4, dtype=torch.bool))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        dapo_policy_loss(**args)

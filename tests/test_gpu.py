"""CUDA checks of the ops and the selection (skipped cleanly on a CPU-only machine).

    .venv/bin/python -m pytest tests/test_gpu.py      # on a GPU machine

Each op on CUDA tensors is compared with a float64 CPU reference, and the CUDA histogram path of
the radix select (torch ops) with the CPU C++ path, which the CPU suite checks against numpy.
"""
from __future__ import annotations

import pytest
import torch

from megafork.algo.loss import dapo_policy_loss
from megafork.forking import select_forking_tokens, topk_threshold
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss, vocab_parallel_logprobs_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference(hidden, weight, labels, vocab):
    z = (hidden.double() @ weight.double().T)[:, :vocab]
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, labels[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_logprob_entropy_ops_on_cuda_match_float64():
    g = torch.Generator().manual_seed(0)
    t, h, v_pad, vocab = 300, 64, 512, 500
    hidden, weight = torch.randn(t, h, generator=g), 0.3 * torch.randn(v_pad, h, generator=g)
    labels = torch.randint(0, vocab, (t,), generator=g)
    want_lp, want_ent = _reference(hidden, weight, labels, vocab)
    dev = torch.device("cuda")
    lp, ent = fused_head_logprobs_entropy(hidden.to(dev), weight.to(dev), labels.to(dev), vocab_size=vocab,
                                          chunk_size=64)
    torch.testing.assert_close(lp.double().cpu(), want_lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.double().cpu(), want_ent, rtol=1e-4, atol=1e-4)
    lp2, ent2 = vocab_parallel_logprobs_entropy((hidden @ weight.T).to(dev), labels.to(dev), vocab_size=vocab)
    torch.testing.assert_close(lp2.double().cpu(), want_lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent2.double().cpu(), want_ent, rtol=1e-4, atol=1e-4)


def test_fused_policy_head_on_cuda_matches_autograd():
    g = torch.Generator().manual_seed(1)
    t, h, vocab = 256, 64, 384
    dev = torch.device("cuda")
    hidden = torch.randn(t, h, generator=g).to(dev).requires_grad_()
    weight = (0.3 * torch.randn(vocab, h, generator=g)).to(dev).requires_grad_()
    labels = torch.randint(0, vocab, (t,), generator=g).to(dev)
    old = (torch.randn(t, generator=g) - 5.0).to(dev)
    adv = torch.randn(t, generator=g).to(dev)
    mask = (torch.rand(t, generator=g) < 0.2).to(dev)
    loss, _ = fused_head_policy_loss(hidden, weight, labels, old, adv, mask, clip_ratio_c=10.0, normalizer=float(t))
    loss.backward()
    hr, wr = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp = torch.log_softmax(hr @ wr.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    ref, _ = dapo_policy_loss(lp, old.double(), adv.double(), mask, clip_ratio_c=10.0, normalizer=float(t))
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), hr.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), wr.grad, rtol=1e-3, atol=1e-6)


def test_selection_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    ent = torch.rand(1 << 20, generator=g) ** 8 * 3.0
    mask = torch.rand(1 << 20, generator=g) < 0.9
    dev = torch.device("cuda")
    assert topk_threshold(ent.to(dev), mask.to(dev), 0.2) == topk_threshold(ent, mask, 0.2)
    sel = select_forking_tokens(ent.to(dev), mask.to(dev), 0.2)
    assert torch.equal(sel.cpu(), select_forking_tokens(ent, mask, 0.2))

"""vocab_parallel_logprobs_entropy on one process: gradcheck, chunking, edge rows, bad input.

The sharded (TP=2/4) comparisons against the float64 reference live in test_ops_tp.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import megafork.ops.vocab_stats as vocab_stats
from megafork.ops import fused_head_logprobs_entropy, vocab_parallel_logprobs_entropy


def _ref(logits, labels, vocab_size, temperature):
    logp = torch.log_softmax(logits[..., :vocab_size].double() / temperature, dim=-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_gradcheck_logprob_and_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3), generator=g)

    def both(x):
        return vocab_parallel_logprobs_entropy(x, labels, temperature=1.3, vocab_size=6)

    assert torch.autograd.gradcheck(both, (logits,))
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_head_logprobs_entropy(a, b, y, temperature=0.6, chunk_size=2), (h, w))


def test_chunked_rows_match_one_block(monkeypatch):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(23, 40, generator=g) * 5).requires_grad_()
    labels = torch.randint(0, 37, (23,), generator=g)
    lp1, ent1 = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=37, temperature=0.5)
    (g1,) = torch.autograd.grad((lp1 + 0.5 * ent1).sum(), logits)
    # 7 rows per block: 23 rows give blocks of 7, 7, 7, 2.
    monkeypatch.setattr(vocab_stats, "DEFAULT_CHUNK_ELEMENTS", 7 * 40)
    lp2, ent2 = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=37, temperature=0.5)
    (g2,) = torch.autograd.grad((lp2 + 0.5 * ent2).sum(), logits)
    torch.testing.assert_close(lp2, lp1)
    torch.testing.assert_close(ent2, ent1)
    torch.testing.assert_close(g2, g1)
    lp_ref, ent_ref = _ref(logits.detach(), labels, 37, 0.5)
    torch.testing.assert_close(lp2.double(), lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent2.double(), ent_ref, rtol=1e-5, atol=1e-5)


def test_edge_rows_uniform_onehot_and_padding_grad():
    v, vocab = 9, 7
    logits = torch.zeros(3, v)
    logits[1, 4] = 1e4  # one-hot: entropy 0 (never negative), logprob 0 at the peak
    logits[2, :] = -1e4
    logits[:, vocab:] = 5e4  # padding columns, hugely positive: must not count
    logits.requires_grad_()
    labels = torch.tensor([2, 4, 6])
    lp, ent = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=vocab)
    torch.testing.assert_close(lp, torch.tensor([-math.log(vocab), 0.0, -math.log(vocab)]))
    torch.testing.assert_close(ent, torch.tensor([math.log(vocab), 0.0, math.log(vocab)]))
    assert (ent >= 0).all()
    (grad,) = torch.autograd.grad((lp + ent).sum(), logits)
    assert torch.equal(grad[:, vocab:], torch.zeros(3, v - vocab)), "padding columns got a gradient"
    assert torch.isfinite(grad).all()


def test_entropy_unused_and_fp64_in_fp64_out():
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 5])
    lp, ent = vocab_parallel_logprobs_entropy(logits, labels)
    assert lp.dtype == ent.dtype == torch.float64
    lp.sum().backward()
    expected = torch.nn.functional.one_hot(labels, 6) - torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, expected)
    half = torch.randn(4, 6).to(torch.bfloat16)
    assert vocab_parallel_logprobs_entropy(half, labels)[0].dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([0, 6])), r"labels.*\[0, 6\).*found 6"),
    (dict(labels=torch.tensor([0, -1])), r"labels.*found -1"),
    (dict(labels=torch.tensor([0.0, 1.0])), r"labels: expected an integer tensor.*float32"),
    (dict(labels=torch.tensor([0, 1, 2])), r"labels: expected shape \(2,\).*found \(3,\)"),
    (dict(temperature=0.0), r"temperature: expected a finite value > 0, found 0.0"),
    (dict(temperature=float("nan")), r"temperature"),
    (dict(vocab_size=7), r"vocab_size: expected 1 <= vocab_size <= padded vocab 6.*found 7"),
    (dict(vocab_size=0), r"vocab_size.*found 0"),
    (dict(logits_shard=torch.zeros(2, 6, dtype=torch.long)), r"logits_shard: expected a floating tensor"),
])
def test_bad_input_names_the_field(kwargs, match):
    args = dict(logits_shard=torch.zeros(2, 6), labels=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs_entropy(**args)

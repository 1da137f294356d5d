"""Fused LM head and fused policy head on one process: memory bound, GEMM work, autograd contract.

Sharded runs (TP=2/4, megatron DDP) against the float64 reference live in test_ops_tp.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megafork.algo.loss import dapo_policy_loss
from megafork.ops import fused_head_logprobs_entropy, fused_head_policy_loss, vocab_parallel_logprobs_entropy

T, H, V = 64, 4, 50


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (the op's outputs, `out=` included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


class GemmFlops(TorchDispatchMode):
    """Counts 2*M*K*N for every matrix product, `out=` and in-place variants included."""

    _ops = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self._ops:
            i, j = self._ops[name]
            a, b = args[i], args[j]
            self.flops += 2 * a.numel() * b.shape[-1]
        else:
            assert "mm" not in name and "matmul" not in name, f"uncounted product {name}"
        return func(*args, **(kwargs or {}))


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    return g, h, w, labels


def _naive(h, w, labels, old, adv, mask, **kw):
    logp = torch.log_softmax(h.double() @ w.double().T, dim=-1)
    lp = logp.gather(1, labels[:, None]).squeeze(1)
    return dapo_policy_loss(lp, old.double(), adv.double(), mask, **kw)[0]


def test_never_materialises_t_by_v():
    chunk = 8
    g, h, w, labels = _inputs()
    bound = max(chunk * V, V * H, T * H)
    assert bound < T * V
    old, adv = torch.randn(T, generator=g) - 4, torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.5
    with LargestTensor() as probe:
        lp, ent = fused_head_logprobs_entropy(h, w, labels, chunk_size=chunk)
        (lp + ent).sum().backward()
        loss, _ = fused_head_policy_loss(h, w, labels, old, adv, mask, chunk_size=chunk)
        loss.backward()
    assert probe.largest <= bound, f"a tensor of {probe.largest} elements exists (bound {bound}, T*V={T * V})"


@pytest.mark.parametrize("rho", [1.0, 0.25, 0.0])
def test_gradient_gemms_scale_with_selected_rows(rho):
    g, h, w, labels = _inputs(1)
    with torch.no_grad():
        old, _ = fused_head_logprobs_entropy(h, w, labels)  # ratio 1: no token is clipped
    adv = torch.randn(T, generator=g).sign()
    mask = torch.zeros(T, dtype=torch.bool)
    k = int(rho * T)
    mask[torch.randperm(T, generator=g)[:k]] = True
    with GemmFlops() as counter:
        loss, _ = fused_head_policy_loss(h, w, labels, old, adv, mask, chunk_size=16)
        loss.backward()
    # one logits GEMM over every row, two gradient GEMMs over the k selected rows, nothing else.
    expected = 2 * T * V * H + 2 * (2 * k * V * H)
    assert counter.flops == expected


def test_bf16_weight_gradient_takes_two_products_for_fp32_precision():
    """bf16: the logits GEMM, dh = dz W (one bf16 product), and dW as hi^T h + lo^T h (two)."""
    from megafork.ops.head_gemm import native_mixed_mm

    native_mixed_mm(torch.device("cpu"), torch.bfloat16)  # its 1x1 probe runs outside the counter
    g, h, w, labels = _inputs(1, torch.bfloat16)
    with torch.no_grad():
        old, _ = fused_head_logprobs_entropy(h, w, labels)
    adv = torch.randn(T, generator=g).sign()
    mask = torch.zeros(T, dtype=torch.bool)
    k = T // 4
    mask[torch.randperm(T, generator=g)[:k]] = True
    with GemmFlops() as counter:
        loss, _ = fused_head_policy_loss(h, w, labels, old, adv, mask, chunk_size=16)
        loss.backward()
    assert counter.flops == 2 * T * V * H + 3 * (2 * k * V * H)


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_policy_head_matches_autograd_shapes_and_split(chunk):
    g, h, w, labels = _inputs(2)
    b, s = 4, T // 4
    old = torch.randn(T, generator=g) * 0.3 - 4
    adv = torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.3
    kw = dict(clip_ratio_c=3.0, normalizer=int(mask.sum()) + 5)
    ref = _naive(h, w, labels, old, adv, mask, **kw)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    # [B, S, H] inputs, split into 3 micro-batches of sequences: the grads accumulate in .grad
    # and the losses add up to the whole batch's, because the normaliser is global.
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        loss, _ = fused_head_policy_loss(
            h.view(b, s, H)[rows], w, labels.view(b, s)[rows], old.view(b, s)[rows], adv.view(b, s)[rows],
            mask.view(b, s)[rows].float(), chunk_size=chunk, **kw)
        loss.backward()
        total += loss.item()
    torch.testing.assert_close(torch.tensor(total, dtype=torch.float64), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-4, atol=1e-6)


def test_backward_scales_by_grad_output_and_runs_once():
    g, h, w, labels = _inputs(3)
    old, adv = torch.randn(T, generator=g) - 4, torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.5
    ref = _naive(h, w, labels, old, adv, mask)
    gh_ref, gw_ref = torch.autograd.grad(0.25 * ref, (h, w))
    loss, _ = fused_head_policy_loss(h, w, labels, old, adv, mask)
    (0.25 * loss).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, gh_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, gw_ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_and_partial_requires_grad():
    g, h, w, labels = _inputs(4)
    old, adv = torch.randn(T, generator=g) - 4, torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.5
    with torch.no_grad():
        loss, metrics = fused_head_policy_loss(h, w, labels, old, adv, mask, response_mask=torch.ones(T))
    assert not loss.requires_grad
    ref = _naive(h, w, labels, old, adv, mask)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    lp, ent = vocab_parallel_logprobs_entropy(h.detach() @ w.detach().T, labels)
    torch.testing.assert_close(metrics["logprobs"], lp)
    torch.testing.assert_close(metrics["entropy"], ent)
    torch.testing.assert_close(metrics["entropy_selected"], ent[mask].mean())
    torch.testing.assert_close(metrics["entropy_all"], ent.mean())
    # Only the weight is trained (e.g. a frozen trunk): no hidden gradient is formed.
    loss, _ = fused_head_policy_loss(h.detach(), w, labels, old, adv, mask)
    (gw,) = torch.autograd.grad(loss, w)
    (gw_ref,) = torch.autograd.grad(ref, w)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-7)


def test_bfloat16_inputs():
    g, h, w, labels = _inputs(5, torch.bfloat16)
    old, adv = torch.randn(T, generator=g) - 4, torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.5
    loss, metrics = fused_head_policy_loss(h, w, labels, old, adv, mask, chunk_size=16)
    loss.backward()
    assert metrics["logprobs"].dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = _naive(h.detach(), w.detach(), labels, old, adv, mask)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("change, match", [
    (dict(weight_shard=torch.zeros(V, H + 1)), r"hidden: expected \[\.\.\., H\] with H = 5"),
    (dict(hidden=torch.zeros(T, H, dtype=torch.float64)), r"hidden: expected dtype torch.float32.*float64"),
    (dict(old_logprobs=torch.zeros(T + 1)), r"old_logprobs: expected shape \(64,\).*found \(65,\)"),
    (dict(advantages=torch.zeros(T, dtype=torch.long)), r"advantages: expected a floating tensor"),
    (dict(loss_mask=torch.full((T,), 0.5)), r"loss_mask: expected bool or 0/1 values, found 0.5"),
    (dict(chunk_size=0), r"chunk_size: expected a positive int or None, found 0"),
    (dict(clip_low=1.0), r"clip_low: expected 0 <= clip_low < 1"),
    (dict(clip_ratio_c=1.0), r"clip_ratio_c: expected None or a finite float > 1"),
    (dict(normalizer=0), r"normalizer: expected a finite count > 0"),
    (dict(labels=torch.full((T,), V)), r"labels \(tp rank 0\): expected ids in \[0, 50\), found 50"),
])
def test_policy_head_bad_input(change, match):
    args = dict(hidden=torch.zeros(T, H), weight_shard=torch.zeros(V, H), labels=torch.zeros(T, dtype=torch.long),
                old_logprobs=torch.zeros(T), advantages=torch.zeros(T), loss_mask=torch.ones(T, dtype=torch.bool))
    kw = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_head_policy_loss(*args.values(), **kw)


class HostReads(TorchDispatchMode):
    """Counts the ops that make a GPU wait for the host: data-dependent shapes and scalar reads."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("nonzero", "_local_scalar_dense", "masked_select", "unique_consecutive", "_unique2"):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_no_per_chunk_host_sync_inside_deferred_checks():
    from megafork.ops import deferred_checks

    g, h, w, labels = _inputs(5)
    old, adv = torch.randn(T, generator=g) - 4, torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) < 0.3
    with deferred_checks(), HostReads() as probe:
        loss, _ = fused_head_policy_loss(h, w, labels, old, adv, mask, chunk_size=4)  # 16 chunks
        loss.backward()
        lp, ent = fused_head_logprobs_entropy(h, w, labels, chunk_size=4)
        (lp * mask + ent).sum().backward()
    # Before: one nonzero per chunk and two label reads per call. Now the row plan costs one
    # host read of the per-chunk counts per call (a .tolist, not dispatched on CPU).
    assert probe.calls == []


def test_rows_by_chunk_matches_nonzero_per_block():
    from megafork.ops.vocab_stats import rows_by_chunk

    g = torch.Generator().manual_seed(6)
    for t, chunk, p in [(37, 8, 0.3), (32, 8, 1.0), (16, 5, 0.0), (1, 4, 1.0), (0, 4, 0.5)]:
        active = torch.rand(t, generator=g) < p
        plan = rows_by_chunk(active, chunk)
        assert len(plan) == -(-t // chunk)
        for i, rows in enumerate(plan):
            block = active[i * chunk:(i + 1) * chunk]
            want = torch.nonzero(block).squeeze(1)
            if rows is None:
                assert bool(block.all())
            else:
                assert torch.equal(rows, want), (t, chunk, i)


def test_deferred_label_check_raises_at_block_exit():
    from megafork.ops import deferred_checks

    _, h, w, labels = _inputs(7)
    bad = labels.clone()
    bad[5] = V + 3
    with pytest.raises(ValueError, match=r"labels \(tp rank 0\): expected ids in \[0, 50\), found 53"):
        fused_head_logprobs_entropy(h, w, bad)  # outside a block: at once
    reached = []
    with pytest.raises(ValueError, match=r"expected ids in \[0, 50\), found 53"):
        with deferred_checks():
            with deferred_checks():  # nested: checked at the outermost exit
                fused_head_logprobs_entropy(h, w, labels)
                lp, _ = fused_head_logprobs_entropy(h, w, bad)
            reached.append(bool(torch.isfinite(lp).all()))  # no error yet, and nothing read out of bounds
    assert reached == [True]
    with pytest.raises(RuntimeError, match="first"):  # an error inside the block is not masked
        with deferred_checks():
            fused_head_logprobs_entropy(h, w, bad)
            raise RuntimeError("first")
    with deferred_checks():  # the pending list was reset
        fused_head_logprobs_entropy(h, w, labels)

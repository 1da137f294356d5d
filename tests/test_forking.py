"""Forking-token selection on one process: thresholds against torch.topk/numpy, modes, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megafork.forking import (
    bottomk_threshold,
    num_forking_tokens,
    radix_select,
    select_forking_tokens,
    topk_threshold,
)


def _case(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "ties":  # few distinct values, zeros, duplicates: ties at every threshold
        h = torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0])[torch.randint(0, 5, (7, 33), generator=g)]
    elif name == "range":  # 1e-30 .. 1e3 plus exact zeros and -0.0
        h = 10.0 ** (torch.rand(7, 33, generator=g, dtype=torch.float64) * 33 - 30)
        h = h.float()
        h[0, :5] = 0.0
        h[1, :3] = -0.0
    else:  # continuous, entropy-like
        h = torch.exp(torch.randn(7, 33, generator=g) * 2 - 4)
    mask = torch.rand(7, 33, generator=g) < 0.75
    mask[3] = False  # an all-padding row
    h[~mask] = torch.where(torch.rand((~mask).sum(), generator=g) < 0.5, -7.0, float("nan"))  # junk padding
    return h, mask


def _kth(values: np.ndarray, k: int, largest: bool) -> float:
    s = np.sort(values.astype(np.float64))
    return float(s[::-1][k - 1] if largest else s[k - 1])


def test_num_forking_tokens():
    assert num_forking_tokens(0.2, 0) == 0
    assert num_forking_tokens(0.2, 10) == 2
    assert num_forking_tokens(0.7, 10) == 7  # 0.7 * 10 == 7.000000000000001 in floats
    assert num_forking_tokens(0.2, 11) == 3
    assert num_forking_tokens(1e-12, 5) == 1
    assert num_forking_tokens(1.0, 5) == 5
    assert num_forking_tokens(0.2, 10_000_001) == 2_000_001


@pytest.mark.parametrize("name", ["ties", "range", "smooth"])
@pytest.mark.parametrize("ratio", [0.2, 1.0, 1e-9, 0.5])
def test_thresholds_and_masks_match_reference(name, ratio):
    h, mask = _case(name)
    valid = h[mask].numpy()
    k = num_forking_tokens(ratio, valid.size)
    tau, tau_b = topk_threshold(h, mask, ratio), bottomk_threshold(h, mask, ratio)
    assert tau == _kth(valid, k, largest=True) == float(torch.topk(h[mask], k).values.min())
    assert tau_b == _kth(valid, k, largest=False)
    top = select_forking_tokens(h, mask, ratio)
    assert torch.equal(top, mask & (h >= tau))
    assert int(top.sum()) >= k and int((mask & (h > tau)).sum()) < k
    bottom = select_forking_tokens(h, mask, ratio, mode="bottom")
    assert torch.equal(bottom, mask & (h <= tau_b)) and int(bottom.sum()) >= k
    # The torch twin gives the same value as the C++ histograms.
    flat_h, flat_m = h.reshape(-1), mask.reshape(-1)
    for largest in (True, False):
        a = radix_select(flat_h.clamp(min=0), flat_m, lambda n: num_forking_tokens(ratio, n), largest, backend="cpp")
        b = radix_select(flat_h.clamp(min=0), flat_m, lambda n: num_forking_tokens(ratio, n), largest,
                         backend="torch")
        assert a == b and a.count_beyond < k <= a.count_beyond + a.count_equal


def test_ties_topk_is_torch_topk_and_exact():
    h, mask = _case("ties")
    for mode, largest in (("top", True), ("bottom", False)):
        sel = select_forking_tokens(h, mask, 0.2, mode=mode, ties="topk")
        k = num_forking_tokens(0.2, int(mask.sum()))
        assert int(sel.sum()) == k and not bool((sel & ~mask).any())
        ref = torch.zeros(mask.numel(), dtype=torch.bool)
        idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
        ref[idx[torch.topk(h.reshape(-1)[idx], k, largest=largest, sorted=False).indices]] = True
        assert torch.equal(sel.reshape(-1), ref)
        # Same multiset of entropies as any exact top-k, even though ties are broken arbitrarily.
        assert torch.equal(h[sel].sort().values, torch.topk(h[mask], k, largest=largest).values.sort().values)


def test_all_and_random_modes():
    h, mask = _case("smooth")
    assert torch.equal(select_forking_tokens(h, mask, 0.3, mode="all"), mask)
    k = num_forking_tokens(0.3, int(mask.sum()))
    a = select_forking_tokens(h, mask, 0.3, mode="random", generator=torch.Generator().manual_seed(5))
    b = select_forking_tokens(h, mask, 0.3, mode="random", generator=torch.Generator().manual_seed(5))
    c = select_forking_tokens(h, mask, 0.3, mode="random", generator=torch.Generator().manual_seed(6))
    assert int(a.sum()) == k and not bool((a & ~mask).any())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_mode_is_uniform():
    # Each of the 34 valid tokens must be picked with probability 7/34 ~ 0.206; 400 draws put
    # every frequency within +- 0.1 of it (about 5 sigma) for this fixed seed.
    mask = torch.ones(40, dtype=torch.bool)
    mask[::7] = False  # 34 valid -> k = ceil(6.8) = 7
    h = torch.zeros(40)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(40)
    trials = 400
    for _ in range(trials):
        counts += select_forking_tokens(h, mask, 0.2, mode="random", generator=g).float()
    freq = counts[mask] / trials
    assert counts[~mask].sum() == 0
    assert float(counts.sum()) == 7 * trials
    assert float((freq - 7 / 34).abs().max()) < 0.1


def test_empty_selection():
    h = torch.rand(4, 5)
    none = torch.zeros(4, 5, dtype=torch.bool)
    assert topk_threshold(h, none, 0.2) == math.inf
    assert bottomk_threshold(h, none, 0.2) == -math.inf
    for mode in ("top", "bottom", "random", "all"):
        assert not bool(select_forking_tokens(h, none, 0.2, mode=mode).any())
    assert not bool(select_forking_tokens(h, none, 0.2, ties="topk").any())
    empty = torch.empty(0)
    assert topk_threshold(empty, empty.bool(), 0.5) == math.inf


def test_half_precision_is_widened_exactly():
    h, mask = _case("smooth")
    hb = h.clamp(min=0).to(torch.bfloat16)
    tau = topk_threshold(hb, mask, 0.2)
    k = num_forking_tokens(0.2, int(mask.sum()))
    assert tau == float(torch.topk(hb[mask].float(), k).values.min())
    assert torch.equal(select_forking_tokens(hb, mask, 0.2), mask & (hb >= tau))


@pytest.mark.parametrize("mode", ["top", "bottom", "random", "all"])
def test_bad_input_raises_naming_rank_and_finding(mode):
    h, mask = _case("smooth")
    call = lambda e, m, r=0.2: select_forking_tokens(e, m, r, mode=mode)  # noqa: E731
    cases = [
        ((h, mask.float()), "rank 0: mask must have dtype torch.bool, found torch.float32"),
        ((h, mask[:, :5]), r"same shape, found \(7, 33\) and \(7, 5\)"),
        ((h.double(), mask), "float64"),
        ((h, mask, 0.0), r"ratio must be in \(0, 1\], found 0.0"),
        ((h, mask, 1.01), "found 1.01"),
        ((h, mask, float("nan")), "found nan"),
        ((h, mask, True), "found bool"),
        ((h.tolist(), mask), "entropy must be a torch.Tensor, found list"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            call(*args)
    for bad, found in ((float("nan"), "1 NaN"), (float("inf"), "1 inf"), (-1e-3, "1 negative")):
        hb = h.clone()
        hb[2, 4] = bad
        mb = mask.clone()
        mb[2, 4] = True
        with pytest.raises(ValueError, match=f"rank 0: entropy must be finite.*{found}.*flat index {2 * 33 + 4}"):
            call(hb, mb)


def test_bad_options_raise():
    h, mask = _case("smooth")
    with pytest.raises(ValueError, match="mode must be one of"):
        select_forking_tokens(h, mask, 0.2, mode="middle")
    with pytest.raises(ValueError, match="ties must be one of"):
        select_forking_tokens(h, mask, 0.2, ties="first")
    with pytest.raises(ValueError, match="ties='topk' applies to modes"):
        select_forking_tokens(h, mask, 0.2, mode="random", ties="topk")
    with pytest.raises(ValueError, match="generator is only used by mode='random'"):
        select_forking_tokens(h, mask, 0.2, generator=torch.Generator())


def test_non_contiguous_inputs():
    h, mask = _case("smooth")
    ht, mt = h.t(), mask.t()  # strided views: flattened in their own (transposed) order
    assert not ht.is_contiguous()
    assert topk_threshold(ht, mt, 0.2) == topk_threshold(h, mask, 0.2)
    assert torch.equal(select_forking_tokens(ht, mt, 0.2), select_forking_tokens(h, mask, 0.2).t())

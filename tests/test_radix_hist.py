"""The C++ radix histograms (megafork._C) against their torch twin and a numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafork import _C
from megafork.forking.histogram import FIRST_INVALID_BIN, NUM_BINS, radix_histogram, radix_histogram_torch


def _numpy_hist(values: np.ndarray, mask: np.ndarray | None, shift: int, match_high: int = -1) -> np.ndarray:
    bits = values.view(np.uint32).copy()
    bits[bits == 0x80000000] = 0  # -0.0 counts as +0.0
    keep = np.ones(bits.shape, bool) if mask is None else mask.copy()
    if match_high >= 0:
        keep &= (bits >> 16) == match_high
    return np.bincount(((bits[keep] >> shift) & 0xFFFF).astype(np.int64), minlength=NUM_BINS)


def _entropy_like(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tiny = torch.exp(torch.randn(n, generator=g) * 3 - 9)  # most tokens: H far below 0.01
    tail = torch.empty(n).exponential_(0.8, generator=g)  # the heavy tail
    pick = torch.rand(n, generator=g) < 0.6
    x = torch.where(pick, tiny, tail).float()
    x[:: 97] = 0.0
    x[5:: 101] = -0.0
    if n > 3:
        x[7:: 89] = x[3]  # duplicates
    return x


@pytest.mark.parametrize("n,threads", [(0, 1), (1, 1), (1000, 1), (1000, 2), ((1 << 19) + 37, 2),
                                       (3 * (1 << 18) + 5, 3), ((1 << 19) + 37, 8)])
def test_cpp_matches_torch_twin_and_numpy(n, threads):
    x = _entropy_like(n, seed=n)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.8
    for m in (None, mask):
        h_np = _numpy_hist(x.numpy(), None if m is None else m.numpy(), 16)
        h_cpp = radix_histogram(x, m, 16, num_threads=threads)
        h_torch = radix_histogram_torch(x, m, 16)
        assert h_cpp.dtype == torch.int64 and h_cpp.shape == (NUM_BINS,)
        np.testing.assert_array_equal(h_cpp.numpy(), h_np)
        assert torch.equal(h_cpp, h_torch)
        assert int(h_cpp.sum()) == (n if m is None else int(m.sum()))
        # Pass 2 over the fullest bin and over an empty bin.
        for high in (int(h_np.argmax()), 0x7000):
            p2_np = _numpy_hist(x.numpy(), None if m is None else m.numpy(), 0, high)
            p2_cpp = radix_histogram(x, m, 0, match_high=high, num_threads=threads)
            np.testing.assert_array_equal(p2_cpp.numpy(), p2_np)
            assert torch.equal(p2_cpp, radix_histogram_torch(x, m, 0, match_high=high))


def test_negative_zero_counts_as_zero_and_invalid_values_land_high():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("nan"), -1e-45, 3e38])
    for h in (radix_histogram(x, None, 16), radix_histogram_torch(x, None, 16)):
        assert int(h[0]) == 2  # +0.0 and -0.0
        assert int(h[0x3F80]) == 1  # 1.0
        assert int(h[FIRST_INVALID_BIN:].sum()) == 4  # -1, inf, nan, the negative denormal
        assert int(h[:FIRST_INVALID_BIN].sum()) == 4
    low = radix_histogram(x, None, 0, match_high=0)
    assert int(low[0]) == 2 and int(low.sum()) == 2


def test_wrapper_checks_inputs():
    x = torch.rand(64)
    with pytest.raises(ValueError, match="float32, found torch.float64"):
        radix_histogram(x.double(), None, 16)
    with pytest.raises(ValueError, match="1-D"):
        radix_histogram(x.view(8, 8), None, 16)
    with pytest.raises(ValueError, match="contiguous"):
        radix_histogram(x[::2], None, 16)
    with pytest.raises(ValueError, match="mask: expected a contiguous"):
        radix_histogram(x[:32], torch.ones(64, dtype=torch.bool)[::2], 16)
    with pytest.raises(ValueError, match="mask: expected dtype torch.bool"):
        radix_histogram(x, torch.ones(64), 16)
    with pytest.raises(ValueError, match=r"mask: expected shape \(64,\)"):
        radix_histogram(x, torch.ones(63, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="CPU tensor, found device meta"):
        radix_histogram(torch.empty(64, device="meta"), None, 16)
    with pytest.raises(ValueError, match="shift"):
        radix_histogram(x, None, 8)
    with pytest.raises(ValueError, match="match_high"):
        radix_histogram(x, None, 0, match_high=1 << 16)
    with pytest.raises(ValueError, match="num_threads"):
        radix_histogram(x, None, 16, num_threads=0)
    # The extension checks for itself too (it is importable without the wrapper).
    with pytest.raises(ValueError, match="float32"):
        _C.radix_histogram(np.zeros(4, np.float64), None, 16)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.radix_histogram(np.zeros(8, np.float32)[::2], None, 16)
    with pytest.raises(ValueError, match="mask"):
        _C.radix_histogram(np.zeros(4, np.float32), np.zeros(3, bool), 16)

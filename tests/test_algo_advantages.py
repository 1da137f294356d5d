"""GRPO advantages, overlong shaping and the dynamic-sampling filter against hand-computed float64 values."""
from __future__ import annotations

import math

import pytest
import torch

from megafork.algo import (
    expand_group_mask,
    grpo_advantages,
    informative_groups,
    overlong_penalty,
    token_advantages,
)


def test_grpo_advantages_by_hand():
    # Group 0: [1, -1, -1, -1]: mean -0.5, unbiased std sqrt((2.25 + 3 * 0.25) / 3) = 1.
    # Group 1: [1, 1, 1, 1]: all equal -> 0 (std 0, eps keeps it finite).
    # Group 2: [0, 2, 4, 6]: mean 3, unbiased std sqrt((9 + 1 + 1 + 9) / 3) = sqrt(20 / 3).
    r = torch.tensor([1, -1, -1, -1, 1, 1, 1, 1, 0, 2, 4, 6], dtype=torch.float64)
    eps = 1e-6
    s2 = math.sqrt(20 / 3)
    expected = torch.tensor(
        [1.5 / (1 + eps), -0.5 / (1 + eps), -0.5 / (1 + eps), -0.5 / (1 + eps), 0, 0, 0, 0,
         -3 / (s2 + eps), -1 / (s2 + eps), 1 / (s2 + eps), 3 / (s2 + eps)], dtype=torch.float64)
    adv = grpo_advantages(r, 4, eps=eps)
    assert adv.dtype == torch.float64 and adv.shape == (12,)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-15)
    # float32 in, float32 out, same values; without std scaling it is just centred.
    torch.testing.assert_close(grpo_advantages(r.float(), 4, eps=eps), expected.float())
    torch.testing.assert_close(grpo_advantages(r, 4, scale_by_std=False),
                               torch.tensor([1.5, -.5, -.5, -.5, 0, 0, 0, 0, -3, -1, 1, 3], dtype=torch.float64))
    # Pairs: [3, 5] -> mean 4, unbiased std sqrt(2).
    torch.testing.assert_close(grpo_advantages(torch.tensor([3.0, 5.0], dtype=torch.float64), 2, eps=0.0),
                               torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)], dtype=torch.float64))


def test_grpo_advantages_bad_input():
    with pytest.raises(ValueError, match="length 10 is not divisible by group_size 4"):
        grpo_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size: expected >= 2"):
        grpo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="group_size: expected a positive int, found 0"):
        grpo_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match=r"1-D tensor \[num_responses\], found shape \(2, 2\)"):
        grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="floating-point dtype, found torch.int64"):
        grpo_advantages(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"found nan at index 3 \(group 1\)"):
        grpo_advantages(torch.tensor([0.0, 1.0, 0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(torch.zeros(4), 2, eps=-1.0)


def test_token_advantages():
    adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(token_advantages(adv, mask),
                               torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="response_mask: expected dtype torch.bool"):
        token_advantages(adv, mask.float())
    with pytest.raises(ValueError, match=r"found \(2,\) and \(3, 3\)"):
        token_advantages(adv, torch.ones(3, 3, dtype=torch.bool))


def test_overlong_penalty_by_hand():
    # Lmax 100, buffer 20: ramp from 80 (0) to 100 (-p); p = 0.5.
    lengths = torch.tensor([0, 50, 80, 81, 90, 99, 100, 130])
    expected = [0, 0, 0, -0.5 * 1 / 20, -0.5 * 10 / 20, -0.5 * 19 / 20, -0.5, -0.5]
    got = overlong_penalty(lengths, max_length=100, buffer_length=20, penalty_factor=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)
    # DAPO's setting: buffer 4096 of 20480, factor 1.
    dapo = overlong_penalty(torch.tensor([16384, 18432, 20480]), 20480, 4096)
    torch.testing.assert_close(dapo, torch.tensor([0.0, -0.5, -1.0]))
    # Buffer equal to the whole length: the ramp starts at 0.
    torch.testing.assert_close(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_bad_input():
    with pytest.raises(ValueError, match="lengths: expected an integer dtype, found torch.float32"):
        overlong_penalty(torch.tensor([1.0]), 10, 5)
    with pytest.raises(ValueError, match="lengths: expected >= 0, found -3 at index 1"):
        overlong_penalty(torch.tensor([1, -3]), 10, 5)
    with pytest.raises(ValueError, match=r"buffer_length: expected an int in \(0, max_length=10\], found 11"):
        overlong_penalty(torch.tensor([1]), 10, 11)
    with pytest.raises(ValueError, match="buffer_length.*found 0"):
        overlong_penalty(torch.tensor([1]), 10, 0)
    with pytest.raises(ValueError, match="max_length: expected a positive int, found 0"):
        overlong_penalty(torch.tensor([1]), 0, 1)
    with pytest.raises(ValueError, match="penalty_factor: expected >= 0, found -1"):
        overlong_penalty(torch.tensor([1]), 10, 5, penalty_factor=-1)
    with pytest.raises(ValueError, match=r"1-D integer tensor, found \(1, 1\)"):
        overlong_penalty(torch.tensor([[1]]), 10, 5)


def test_informative_groups():
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    groups = informative_groups(acc, 4)
    assert groups.tolist() == [True, False, True, True]
    # Groups whose rewards all equal drop out of the batch, response by response.
    keep = expand_group_mask(groups, 4)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 8
    # An informative group is one with a nonzero GRPO advantage somewhere.
    adv = grpo_advantages(acc, 4)
    torch.testing.assert_close(groups, adv.view(4, 4).abs().amax(1) > 0)
    with pytest.raises(ValueError, match="length 5 is not divisible by group_size 2"):
        informative_groups(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_mask: expected a 1-D bool tensor"):
        expand_group_mask(torch.ones(3), 2)

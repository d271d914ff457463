"""group_advantages against hand-computed values (paper eq. 2, population std) and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from grpo.advantages import group_advantages

EPS = 1e-6


def test_group_scale_hand_values():
    # groups [1, 2] and [3, 4]: means 1.5, 3.5; centred [-0.5, 0.5]; population std sqrt((0.25+0.25)/2) = 0.5
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64) / (0.5 + EPS)
    torch.testing.assert_close(group_advantages(rewards, 2), expected, rtol=0, atol=1e-15)


def test_population_not_sample_std():
    # group [0, 0, 3]: mean 1, centred [-1, -1, 2], population var (1+1+4)/3 = 2 -> std sqrt(2)
    # (Bessel's n-1 would give sqrt(3))
    rewards = torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64) / (math.sqrt(2.0) + EPS)
    torch.testing.assert_close(group_advantages(rewards, 3), expected, rtol=0, atol=1e-15)


def test_batch_scale_hand_values():
    # group means 1.5, 3.5 -> centred [-0.5, 0.5, -0.5, 0.5]; batch [1,2,3,4]: mean 2.5,
    # population var (2.25+0.25+0.25+2.25)/4 = 1.25 -> std sqrt(1.25)
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64) / (math.sqrt(1.25) + EPS)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected, rtol=0, atol=1e-15)


def test_none_scale_only_centres():
    # Dr. GRPO: groups [1, 5] and [0, 4]: [1, 5] - 3 = [-2, 2]; [0, 4] - 2 = [-2, 2]
    rewards = torch.tensor([1.0, 5.0, 0.0, 4.0], dtype=torch.float64)
    expected = torch.tensor([-2.0, 2.0, -2.0, 2.0], dtype=torch.float64)
    assert torch.equal(group_advantages(rewards, 2, scale="none"), expected)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_groups_are_exactly_zero(scale, eps, dtype):
    # three copies of 0.1 average to 0.10000000000000002 in float64; a naive (R - mean) / std then gives
    # -1.4e-17 / 1.4e-17 = -1 for eps = 0. Group 2 is "all invalid" (every sample got the -0.1 penalty),
    # group 3 carries the only signal: [0, 1, 2] - 1 = [-1, 0, 1].
    rewards = torch.tensor([0.1, 0.1, 0.1, -0.1, -0.1, -0.1, 0.0, 1.0, 2.0], dtype=dtype)
    adv = group_advantages(rewards, 3, scale=scale, eps=eps)
    assert torch.equal(adv[:6], torch.zeros(6, dtype=dtype))
    assert adv[6] < 0 and adv[7] == 0 and adv[8] > 0


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_all_equal_batch_is_exactly_zero(scale, eps):
    # group size 5 like the paper's rollouts; every sample invalid
    adv = group_advantages(torch.full((10,), -0.1), 5, scale=scale, eps=eps)
    assert torch.equal(adv, torch.zeros(10))


def test_group_size_one_gives_zero():
    # a lone sample has nothing to be compared with
    assert torch.equal(group_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_returns_input_dtype_close_to_fp32(dtype):
    rewards = torch.tensor([-1.25, 0.5, 2.0, 3.0, -0.1, -0.1, 0.7, 0.2])
    adv = group_advantages(rewards.to(dtype), 4)
    assert adv.dtype == dtype
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.float(), group_advantages(rewards, 4), rtol=2e-2, atol=2e-2)


def test_integer_rewards_give_float_advantages():
    # [0, 1]: centred [-0.5, 0.5], std 0.5
    adv = group_advantages(torch.tensor([0, 1]), 2)
    assert adv.dtype == torch.get_default_dtype()
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (0.5 + EPS))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_names_index(bad):
    rewards = torch.tensor([0.0, 1.0, 2.0, bad])
    with pytest.raises(ValueError, match=r"index 3 \(group 1\)"):
        group_advantages(rewards, 2)


@pytest.mark.parametrize(
    ("rewards", "group_size", "scale", "match"),
    [
        (torch.zeros(6), 4, "group", "not a multiple of group_size"),
        (torch.zeros(4), 0, "group", "positive int"),
        (torch.zeros(4), 2.0, "group", "positive int"),
        (torch.zeros(4), 2, "std", "unknown scale"),
        (torch.zeros(2, 2), 2, "group", "1-D"),
        (torch.zeros(0), 2, "group", "non-empty"),
    ],
)
def test_rejects_bad_input(rewards, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, scale=scale)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def grouped_rewards(draw):
    group_size = draw(st.integers(1, 6))
    n_groups = draw(st.integers(1, 4))
    values = draw(st.lists(finite, min_size=group_size * n_groups, max_size=group_size * n_groups))
    return torch.tensor(values, dtype=torch.float64), group_size


@settings(max_examples=60, deadline=None)
@given(grouped_rewards(), st.sampled_from(["group", "batch", "none"]))
def test_each_group_sums_to_zero(batch, scale):
    rewards, group_size = batch
    adv = group_advantages(rewards, group_size, scale=scale)
    sums = adv.view(-1, group_size).sum(dim=-1)
    # |A| <= sqrt(group_size) for group scaling; for the others the sum is relative to the reward size
    tol = 1e-9 * (1.0 + rewards.abs().max().item())
    assert torch.all(sums.abs() <= tol * group_size)


@settings(max_examples=60, deadline=None)
@given(grouped_rewards(), st.data())
def test_invariant_to_shifting_a_group(batch, data):
    rewards, group_size = batch
    n_groups = rewards.numel() // group_size
    shifts = torch.tensor(
        data.draw(st.lists(finite, min_size=n_groups, max_size=n_groups)), dtype=torch.float64
    )
    shifted = rewards + shifts.repeat_interleave(group_size)
    for scale in ("group", "none"):
        torch.testing.assert_close(
            group_advantages(shifted, group_size, scale=scale),
            group_advantages(rewards, group_size, scale=scale),
            rtol=1e-6,
            atol=1e-6,
        )


@settings(max_examples=40, deadline=None)
@given(grouped_rewards())
def test_group_scale_has_unit_std_per_group(batch):
    # with eps = 0 every group that is not constant has population std exactly 1 after scaling
    rewards, group_size = batch
    adv = group_advantages(rewards, group_size, eps=0.0).view(-1, group_size)
    varied = rewards.view(-1, group_size).std(dim=-1, unbiased=False) > 1e-6
    assume(varied.any())
    torch.testing.assert_close(
        adv[varied].std(dim=-1, unbiased=False), torch.ones(int(varied.sum()), dtype=torch.float64)
    )

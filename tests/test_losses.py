"""Loss math against hand-computed values: aggregation modes, clipped policy loss, KL estimators, log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.losses import (
    AGG_MODES,
    AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    policy_loss,
    token_logprobs,
)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- masked_mean and aggregate


def test_masked_mean_hand_values():
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # all: (1 + 2 + 4) / 3; per row: [1.5, 4]; per column: [2.5, 2, 0 (nothing valid)]
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    assert torch.equal(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0]))
    assert torch.equal(masked_mean(x, mask, dim=0), torch.tensor([2.5, 2.0, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# rows: [1, 2 | garbage], [3 | garbage garbage], fully masked row of garbage
PER_TOKEN = [[1.0, 2.0, NAN], [3.0, INF, -INF], [NAN, INF, 5.0]]
MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
# (value, d value / d per_token on the valid tokens [row0 tok0, row0 tok1, row1 tok0])
AGG_EXPECTED = {
    # (1 + 2 + 3) / 3 tokens; each token weighs 1/3
    "token-mean": (2.0, [1 / 3, 1 / 3, 1 / 3]),
    # row means [1.5, 3], the empty row is not a sequence: (1.5 + 3) / 2 = 2.25; weights 1/(2*2), 1/(2*1)
    "seq-mean-token-mean": (2.25, [0.25, 0.25, 0.5]),
    # row sums [3, 3]: (3 + 3) / 2 = 3; each token weighs 1/2
    "seq-mean-token-sum": (3.0, [0.5, 0.5, 0.5]),
    # (1 + 2 + 3) / (2 sequences * max_len 4) = 0.75; each token weighs 1/8
    "seq-mean-token-sum-norm": (0.75, [0.125, 0.125, 0.125]),
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_hand_values_ignore_padding_garbage(mode):
    value, weights = AGG_EXPECTED[mode]
    x = torch.tensor(PER_TOKEN, requires_grad=True)
    mask = torch.tensor(MASK)
    out = aggregate(x, mask, mode, max_len=4)
    assert out.item() == pytest.approx(value)
    out.backward()
    expected_grad = torch.zeros(3, 3)
    expected_grad[0, 0], expected_grad[0, 1], expected_grad[1, 0] = weights
    torch.testing.assert_close(x.grad, expected_grad)  # zero (not NaN) on every padded position


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_extra_padding_changes_nothing(mode):
    x = torch.tensor(PER_TOKEN)
    mask = torch.tensor(MASK)
    # two more padded columns of garbage and one more fully padded row
    wide_x = torch.cat([x, torch.full((3, 2), NAN)], dim=1)
    wide_x = torch.cat([wide_x, torch.full((1, 5), INF)], dim=0)
    wide_mask = torch.zeros(4, 5, dtype=mask.dtype)
    wide_mask[:3, :3] = mask
    assert aggregate(wide_x, wide_mask, mode, max_len=4).item() == aggregate(x, mask, mode, max_len=4).item()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_all_masked_is_zero_with_zero_gradient(mode):
    x = torch.full((2, 3), NAN, requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3, dtype=torch.bool), mode, max_len=3)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_bf16_close_to_fp32(mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen)
    mask = torch.rand(4, 16, generator=gen) > 0.3
    out = aggregate(x.bfloat16(), mask, mode, max_len=16)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.float(), aggregate(x, mask, mode, max_len=16), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_gradcheck(mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda t: aggregate(t, mask, mode, max_len=5), (x,))


def test_aggregate_rejects_bad_input():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(x, mask, "mean")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(x, torch.ones(2, 4), "token-mean")


@st.composite
def padded_batches(draw):
    rows, cols, pad = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    values = draw(st.lists(st.floats(-100, 100), min_size=rows * cols, max_size=rows * cols))
    valid = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    garbage = draw(st.sampled_from([NAN, INF, -INF, 1e30]))
    return torch.tensor(values).view(rows, cols), torch.tensor(valid).view(rows, cols), pad, garbage


@settings(max_examples=60, deadline=None)
@given(padded_batches(), st.sampled_from(AGG_MODES))
def test_aggregate_invariant_to_padding_property(batch, mode):
    # masked tokens overwritten by garbage, then more garbage columns appended: same result
    x, valid, pad, garbage = batch
    dirty = torch.cat([torch.where(valid, x, garbage), torch.full((x.shape[0], pad), garbage)], dim=1)
    dirty_valid = torch.cat([valid, torch.zeros(x.shape[0], pad, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(
        aggregate(dirty, dirty_valid, mode, max_len=8),
        aggregate(x, valid, mode, max_len=8),
        rtol=1e-6,
        atol=1e-5,
    )


# aggregate * normaliser on PER_TOKEN / MASK: the sum over units (tokens or sequences) that aggregate averages
AGG_SUMS = {
    "token-mean": 1.0 + 2.0 + 3.0,  # tokens
    "seq-mean-token-mean": 1.5 + 3.0,  # row means
    "seq-mean-token-sum": 3.0 + 3.0,  # row sums
    "seq-mean-token-sum-norm": (3.0 + 3.0) / 4,  # row sums / max_len
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_each_normaliser_is_what_its_aggregation_divides_by(mode):
    mask = torch.tensor(MASK)
    total = aggregate(torch.tensor(PER_TOKEN), mask, mode, max_len=4) * AGGREGATIONS[mode].normaliser(mask)
    assert total.item() == pytest.approx(AGG_SUMS[mode])


@settings(max_examples=60, deadline=None)
@given(padded_batches(), st.sampled_from(AGG_MODES), st.data())
def test_aggregate_times_normaliser_adds_up_over_a_split_of_the_rows(batch, mode, data):
    # what micro-batch accumulation relies on: each part's share normaliser(part) / normaliser(whole)
    x, valid, _, garbage = batch
    x = torch.where(valid, x, garbage).double()
    cut = data.draw(st.integers(0, x.shape[0]))
    normaliser = AGGREGATIONS[mode].normaliser

    def summed(rows: slice) -> torch.Tensor:
        return aggregate(x[rows], valid[rows], mode, max_len=8) * normaliser(valid[rows])

    parts = summed(slice(0, cut)) + summed(slice(cut, None))
    torch.testing.assert_close(parts, summed(slice(None)), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- policy_loss

# Two sequences, A = [+1, -2]; row 0 has one padded token (NaN garbage in every input).
# ratios r = [[1.5, 0.5, pad], [1.5, 0.5, 1.1]], clip range [0.8, 1.2]; loss_t = -min(r A, clip(r) A):
#   row 0, A=+1: r=1.5 -> min(1.5, 1.2) = 1.2, clipped   -> -1.2
#                r=0.5 -> min(0.5, 0.8) = 0.5, unclipped -> -0.5
#   row 1, A=-2: r=1.5 -> min(-3.0, -2.4) = -3.0, unclipped -> 3.0
#                r=0.5 -> min(-1.0, -1.6) = -1.6, clipped   -> 1.6
#                r=1.1 -> min(-2.2, -2.2) = -2.2, inside    -> 2.2
HAND_RATIOS = [[1.5, 0.5, 1.0], [1.5, 0.5, 1.1]]
HAND_MASK = [[1, 1, 0], [1, 1, 1]]
HAND_ADV = [1.0, -2.0]


def hand_inputs(dtype=torch.float64):
    old = torch.tensor([[-1.0, -2.0, NAN], [-0.5, -3.0, -1.5]], dtype=dtype)
    new = old + torch.log(torch.tensor(HAND_RATIOS, dtype=dtype))
    new[0, 2] = NAN
    return new.requires_grad_(), old, torch.tensor(HAND_ADV, dtype=dtype), torch.tensor(HAND_MASK)


def test_policy_loss_hand_values_and_metrics():
    new, old, adv, mask = hand_inputs()
    loss, metrics = policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 3.0 + 1.6 + 2.2) / 5)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    # k3 of KL(old || new): mean of r - 1 - log r over the 5 valid tokens
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.1)]
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 5)
    assert all(not v.requires_grad for v in metrics.values())

    loss.backward()
    # d loss_t / d logp_t = -A r on unclipped tokens, 0 on clipped ones, all divided by 5 tokens
    expected = torch.tensor([[0.0, -1.0 * 0.5, 0.0], [2.0 * 1.5, 0.0, 2.0 * 1.1]], dtype=torch.float64) / 5
    torch.testing.assert_close(new.grad, expected)


def test_policy_loss_per_token_advantages_match_per_sequence():
    new, old, adv, mask = hand_inputs()
    loss_seq, _ = policy_loss(new, old, adv, mask)
    loss_tok, _ = policy_loss(new, old, adv[:, None].expand(2, 3).clone(), mask)
    assert loss_tok.item() == loss_seq.item()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_first_step_gradient(agg):
    # at the first PPO epoch logp == old_logp, so r = 1, nothing is clipped, loss_t = -A and the gradient of
    # loss_t w.r.t. logp_t is -A (the REINFORCE gradient); the aggregation then weighs each token.
    old = torch.tensor([[-1.0, -2.0, -0.5, NAN], [-0.7, -1.1, NAN, NAN]], dtype=torch.float64)
    new = old.clone().requires_grad_()
    adv = torch.tensor([0.5, -1.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, metrics = policy_loss(new, old, adv, mask, agg=agg, max_len=4)
    loss.backward()
    # per-token weights: token-mean 1/5 tokens; seq-mean-token-mean 1/(2*3), 1/(2*2);
    # seq-mean-token-sum 1/2; seq-mean-token-sum-norm 1/(2*4)
    weights = {
        "token-mean": (1 / 5, 1 / 5),
        "seq-mean-token-mean": (1 / 6, 1 / 4),
        "seq-mean-token-sum": (1 / 2, 1 / 2),
        "seq-mean-token-sum-norm": (1 / 8, 1 / 8),
    }[agg]
    expected = torch.tensor(
        [[-0.5 * weights[0]] * 3 + [0.0], [1.5 * weights[1]] * 2 + [0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(new.grad, expected)
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["ratio_mean"].item() == 1.0 and metrics["ratio_max"].item() == 1.0


def test_clip_higher_only_widens_the_upper_bound_for_positive_advantages():
    # clip_low 0.2, clip_high 0.28 -> clip range [0.8, 1.28]; one token per sequence
    ratios = torch.tensor([[1.25], [0.75], [1.25], [0.75]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    old = torch.zeros(4, 1, dtype=torch.float64)
    mask = torch.ones(4, 1)

    def per_sequence(clip_high):
        new = torch.log(ratios).requires_grad_()
        loss, metrics = policy_loss(
            new, old, adv, mask, clip_low=0.2, clip_high=clip_high, agg="seq-mean-token-sum"
        )
        loss.backward()
        return new.grad.flatten() * 4, metrics["clip_fraction"].item()  # undo the mean over 4 sequences

    sym_grad, sym_clip = per_sequence(0.2)
    high_grad, high_clip = per_sequence(0.28)
    # A=+1, r=1.25: symmetric clips at 1.2 (no gradient); clip-higher keeps it: gradient -A r = -1.25
    # A=-1, r=0.75: both clip at the lower bound 0.8 -> no gradient
    # A=-1, r=1.25 and A=+1, r=0.75: the unclipped branch is the min for any bounds: gradient -A r
    torch.testing.assert_close(sym_grad, torch.tensor([0.0, 0.0, 1.25, -0.75], dtype=torch.float64))
    torch.testing.assert_close(high_grad, torch.tensor([-1.25, 0.0, 1.25, -0.75], dtype=torch.float64))
    assert sym_clip == pytest.approx(2 / 4) and high_clip == pytest.approx(1 / 4)


def test_policy_loss_clamps_huge_log_ratio():
    # logp - old = 100 would overflow exp in fp32; clamped to 20 the ratio is e^20 and everything stays finite
    new = torch.tensor([[100.0, 0.0]], requires_grad=True)
    old = torch.zeros(1, 2)
    loss, metrics = policy_loss(new, old, torch.tensor([-1.0]), torch.ones(1, 2))
    # A=-1: token 0 unclipped -> -(-1 * e^20) = e^20; token 1 r=1 -> 1; mean over 2 tokens
    assert loss.item() == pytest.approx((math.exp(20.0) + 1.0) / 2, rel=1e-5)
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 0] == 0.0  # beyond the clamp: no gradient


def test_policy_loss_all_masked_is_zero():
    new = torch.full((2, 3), NAN, requires_grad=True)
    loss, metrics = policy_loss(new, torch.full((2, 3), NAN), torch.tensor([NAN, 1.0]), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in metrics.values())
    loss.backward()
    assert torch.equal(new.grad, torch.zeros(2, 3))


def test_policy_loss_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(4, 12, generator=gen) * 5
    new = old + 0.3 * torch.randn(4, 12, generator=gen)
    adv = torch.randn(4, generator=gen)
    mask = torch.rand(4, 12, generator=gen) > 0.2
    # compare on the bf16-rounded values, so only the loss computation's own precision is tested
    new16, old16 = new.bfloat16().requires_grad_(), old.bfloat16()
    loss16, metrics16 = policy_loss(new16, old16, adv.bfloat16(), mask)
    loss32, metrics32 = policy_loss(new16.detach().float(), old16.float(), adv.bfloat16().float(), mask)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    torch.testing.assert_close(loss16, loss32)
    torch.testing.assert_close(metrics16["approx_kl"], metrics32["approx_kl"])
    loss16.backward()
    assert new16.grad.dtype == torch.bfloat16 and torch.isfinite(new16.grad).all()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_gradcheck(agg):
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(3, 6, dtype=torch.float64, generator=gen) * 3
    # log-ratios spread over [-0.5, 0.5] so that both branches occur; none sits within gradcheck's eps of a kink
    new = (old + torch.rand(3, 6, dtype=torch.float64, generator=gen) - 0.5).requires_grad_()
    ratio = torch.exp(new.detach() - old)
    assert ((ratio > 1.2) | (ratio < 0.8)).any() and ((ratio < 1.19) & (ratio > 0.81)).any()
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    assert torch.autograd.gradcheck(lambda t: policy_loss(t, old, adv, mask, agg=agg, max_len=6)[0], (new,))


def test_policy_loss_rejects_bad_input():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        policy_loss(x, x, torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(x, x, torch.zeros(2), mask, clip_low=-0.1)


# ---------------------------------------------------------------- kl_penalty


def test_kl_penalty_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    ref = torch.tensor([-2.0, -1.0, -0.3])
    # d = ref - logp = [-1, 1, 0]
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))  # -d
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0]))  # d^2 / 2
    # exp(d) - d - 1: e^-1 + 1 - 1, e - 1 - 1, 0
    k3 = torch.tensor([math.exp(-1.0), math.e - 2.0, 0.0])
    assert torch.allclose(kl_penalty(logp, ref, "k3"), k3)
    assert kl_penalty(logp, ref).tolist() == kl_penalty(logp, ref, "k3").tolist()  # k3 is the default


def test_kl_penalty_k3_clamped_and_finite_gradient():
    # d = -100 (clamped to -20): e^-20 + 20 - 1 ~ 19 -> 10;  d = +100 (clamped to 20; e^100 would be inf in
    # fp32 and make the gradient 0 * inf = NaN): e^20 - 21 -> 10;  d = 2: e^2 - 3 = 4.389 stays
    logp = torch.tensor([0.0, -100.0, -2.0], requires_grad=True)
    ref = torch.tensor([-100.0, 0.0, 0.0])
    kl = kl_penalty(logp, ref, "k3")
    torch.testing.assert_close(kl, torch.tensor([10.0, 10.0, math.exp(2.0) - 3.0]))
    kl.sum().backward()
    # d k3 / d logp = 1 - exp(d): 0 where the clamp is active, 1 - e^2 at d = 2
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 1.0 - math.exp(2.0)]))


def test_kl_penalty_zero_at_reference_with_zero_k3_gradient():
    logp = torch.tensor([-1.0, -4.0], requires_grad=True)
    kl_penalty(logp, logp.detach().clone(), "k3").sum().backward()
    assert torch.equal(logp.grad, torch.zeros(2))


def test_kl_penalty_bf16_close_to_fp32():
    logp = torch.tensor([-1.0, -2.5, -0.25, -6.0])
    ref = torch.tensor([-1.5, -2.0, -0.25, -3.0])
    for kind in ("k1", "k2", "k3"):
        low = kl_penalty(logp.bfloat16(), ref.bfloat16(), kind)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, kl_penalty(logp, ref, kind))  # these values are exact in bf16


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_gradcheck(kind):
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(2, 5, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    ref = (-torch.rand(2, 5, dtype=torch.float64, generator=gen) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind), (logp, ref))


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown KL kind"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------- token_logprobs and entropy


def test_token_logprobs_hand_values():
    # logits [0, ln 3] -> p = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[0, 1]])
    torch.testing.assert_close(
        token_logprobs(logits, labels), torch.tensor([[math.log(0.25), math.log(0.75)]])
    )
    # softmax is shift invariant and logsumexp must not overflow at 1e4
    torch.testing.assert_close(
        token_logprobs(logits + 1e4, labels),
        torch.tensor([[math.log(0.25), math.log(0.75)]]),
        atol=2e-3,
        rtol=0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_log_softmax_in_value_and_gradient(dtype):
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(3, 7, 11, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen)
    # chunk_rows=4 splits the 21 rows into 6 chunks on the low-precision path
    out = token_logprobs(logits, labels, chunk_rows=4)
    assert out.dtype == torch.float32
    (out * weights).sum().backward()

    ref_logits = logits.detach().float().requires_grad_()
    ref = torch.log_softmax(ref_logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=1e-2, atol=1e-2)


def test_entropy_hand_values():
    # p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4); uniform over 2 and 5: ln 2, ln 5; the same at a 1e4 offset
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([h, math.log(2.0)]))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(5)), torch.tensor(math.log(5.0)))
    # at 1e4 fp32 keeps ln 3 to ~5e-4
    torch.testing.assert_close(
        entropy_from_logits(torch.tensor([1e4, 1e4 + math.log(3.0)])), torch.tensor(h), atol=1e-3, rtol=0
    )


def test_entropy_bf16_close_to_fp32():
    gen = torch.Generator().manual_seed(6)
    logits = (4 * torch.randn(2, 5, 9, generator=gen)).bfloat16()
    out = entropy_from_logits(logits, chunk_rows=3)
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    torch.testing.assert_close(out, entropy_from_logits(logits.float()))

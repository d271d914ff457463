"""grpo/trainer.py: reward sanitising, micro-batch accumulation, KL against a reference, logging, and learning."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from grpo.generation import HFGenerator, Rollout
from grpo.run_log import read_log
from grpo.trainer import GRPOConfig, GRPOTrainer, micro_batch_weight, sanitize_rewards
from tests.toy import digit_reward, toy_model, toy_prompts, toy_tokenizer

PROMPTS, GROUP = 2, 8  # 16 samples per step


class FixedGenerator:
    """Returns the same rollout every call (stamped with the current weight version): a step without sampling."""

    def __init__(self, rollout: Rollout, stale_by: int = 0):
        self.rollout, self.stale_by = rollout, stale_by
        self.weight_version = 0

    def generate(self, prompts, n, sampling, constraints=None) -> Rollout:
        assert len(prompts) * n == self.rollout.num_samples
        return dataclasses.replace(self.rollout, weight_version=self.weight_version - self.stale_by)


def fixed_rollout(vocab: int, *, seed: int = 0) -> Rollout:
    """16 samples of random tokens with varied prompt and response lengths; row 5 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    n, p_len, r_len = PROMPTS * GROUP, 6, 7
    prompt_ids = torch.randint(3, vocab, (n, p_len), generator=g)
    prompt_lens = torch.randint(2, p_len + 1, (n,), generator=g)
    prompt_mask = (torch.arange(p_len) >= p_len - prompt_lens[:, None]).long()  # left padding
    response_ids = torch.randint(3, vocab, (n, r_len), generator=g)
    response_lens = torch.randint(1, r_len + 1, (n,), generator=g)
    response_lens[5] = 0
    response_mask = (torch.arange(r_len) < response_lens[:, None]).long()
    return Rollout(
        prompt_ids=prompt_ids.masked_fill(prompt_mask == 0, 0),
        prompt_mask=prompt_mask,
        response_ids=response_ids.masked_fill(response_mask == 0, 0),
        response_mask=response_mask,
        truncated=response_lens == r_len,
    )


def index_reward(metas, texts):
    """A fixed, varied reward per sample (its position in the batch), independent of the text."""
    return [float((i * 7) % 5) for i in range(len(texts))], [{} for _ in texts]


def make_trainer(
    tmp_path,
    *,
    model=None,
    reward_fn=index_reward,
    ref_model=None,
    generator=None,
    compute_dtype=torch.float32,
    **overrides,
):
    tokenizer = toy_tokenizer()
    model = model if model is not None else toy_model(seed=0)
    settings = dict(
        total_steps=4,
        prompts_per_step=PROMPTS,
        group_size=GROUP,
        micro_batch_size=16,
        lr=1e-3,
        kl_coef=0.0,
        max_new_tokens=7,
        checkpoint_every=100,
    )
    config = GRPOConfig(**{**settings, **overrides})
    return GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=generator or FixedGenerator(fixed_rollout(len(tokenizer))),
        prompts=toy_prompts(4),
        reward_fn=reward_fn,
        config=config,
        run_dir=tmp_path,
        ref_model=ref_model,
        console_log=False,
        compute_dtype=compute_dtype,
    )


def grads_and_weights(trainer: GRPOTrainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradient the update used (the trainer zeroes before, not after) and the updated weights."""
    params = dict(trainer.model.named_parameters())
    return {k: p.grad.clone() for k, p in params.items()}, {k: p.detach().clone() for k, p in params.items()}


# ------------------------------------------------------------------------------ rewards


def test_sanitize_rewards_replaces_nonfinite_by_the_worst_finite_reward():
    values, bad = sanitize_rewards([1.0, float("nan"), 0.5, float("inf"), float("-inf"), 2.0])
    assert values.tolist() == [1.0, 0.5, 0.5, 0.5, 0.5, 2.0]  # +inf is no bonus, -inf no outlier
    assert bad == 3
    values, bad = sanitize_rewards([float("nan")] * 3)
    assert values.tolist() == [0.0, 0.0, 0.0] and bad == 3
    values, bad = sanitize_rewards([3, 1])
    assert values.tolist() == [3.0, 1.0] and values.dtype == torch.float64 and bad == 0


def test_nonfinite_rewards_are_counted_and_reported(tmp_path):
    def reward(metas, texts):
        rewards, infos = index_reward(metas, texts)
        rewards[0], rewards[3] = float("nan"), float("inf")
        return rewards, infos

    metrics = make_trainer(tmp_path, reward_fn=reward).step()
    assert metrics["nonfinite_rewards"] == 2
    assert metrics["reward_max"] == 4.0 and metrics["reward_min"] == 0.0
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.parametrize(
    ("reward_fn", "error"),
    [
        pytest.param(lambda metas, texts: 1 / 0, "ZeroDivisionError", id="raises"),
        pytest.param(lambda metas, texts: ([1.0], [{}]), "ValueError", id="wrong-length"),
        pytest.param(
            lambda metas, texts: ([None] * len(texts), [{}] * len(texts)), "TypeError", id="not-numbers"
        ),
    ],
)
def test_a_failing_reward_costs_the_step_its_signal_not_the_run(tmp_path, reward_fn, error):
    trainer = make_trainer(tmp_path, reward_fn=reward_fn, weight_decay=0.0)
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    metrics = trainer.step()
    assert metrics[f"penalty/reward_error: {error}"] == 16
    assert metrics["valid_fraction"] == 0.0 and metrics["reward_std"] == 0.0
    assert metrics["grad_norm"] == 0.0  # zero advantages: no policy gradient
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert trainer.step_count == 1


# ------------------------------------------------------------------------------ micro-batches


def test_micro_batch_weight_shares():
    mini = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    assert micro_batch_weight(mini[:2], mini, "token-mean") == pytest.approx(3 / 6)
    assert micro_batch_weight(mini[2:3], mini, "token-mean") == 0.0
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert micro_batch_weight(mini[:2], mini, mode) == pytest.approx(
            2 / 3
        )  # the empty row is no sequence
        assert micro_batch_weight(mini[2:], mini, mode) == pytest.approx(1 / 3)
    assert micro_batch_weight(mini[2:3], mini[2:3], "token-mean") == 0.0  # nothing valid: no division by zero


@pytest.mark.parametrize(
    ("loss_agg", "micro"),
    [("token-mean", 2), ("token-mean", 1), ("seq-mean-token-mean", 3), ("seq-mean-token-sum-norm", 2)],
)
def test_micro_batch_accumulation_equals_one_full_batch(tmp_path, loss_agg, micro):
    """Same rollout (with a fully masked row), same update: micro-batches of 2, 3 (uneven split) or 1 (one of them
    only the masked row) give the gradient and the new weights of a single pass over all 16 samples."""
    model = toy_model(seed=0)
    results = {}
    for size in (16, micro):
        trainer = make_trainer(
            tmp_path / str(size), model=copy.deepcopy(model), micro_batch_size=size, loss_agg=loss_agg
        )
        assert trainer.step()["grad_norm"] > 0
        results[size] = grads_and_weights(trainer)
    (full_grads, full_weights), (grads, weights) = results[16], results[micro]
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], atol=1e-7, rtol=1e-4)
        # Adam's first step is lr * g / (|g| + eps): where g ~ eps, float rounding of g moves a weight by a
        # visible fraction of lr, so weights are compared to lr / 10 (the gradients above are the tight check)
        torch.testing.assert_close(weights[name], full_weights[name], atol=1e-4, rtol=0)
    before = dict(model.named_parameters())
    assert max((full_weights[k] - before[k]).abs().max().item() for k in before) > 5e-4  # a real update


# ------------------------------------------------------------------------------ KL and reference model


def test_kl_needs_a_reference_model(tmp_path):
    with pytest.raises(ValueError, match="reference model"):
        make_trainer(tmp_path, kl_coef=0.01)
    make_trainer(tmp_path, kl_coef=0.0)  # no reference needed


def test_kl_is_zero_against_an_identical_reference_then_grows(tmp_path):
    model = toy_model(seed=0)
    trainer = make_trainer(tmp_path, model=model, ref_model=copy.deepcopy(model), kl_coef=0.1)
    first = trainer.step()
    assert abs(first["kl"]) < 1e-6
    second = trainer.step()
    assert second["kl"] > 1e-5  # the policy moved away from the frozen reference


def test_zero_temperature_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        make_trainer(tmp_path, temperature=0.0)


def test_stale_rollouts_are_refused(tmp_path):
    tokenizer = toy_tokenizer()
    stale = FixedGenerator(fixed_rollout(len(tokenizer)), stale_by=1)
    with pytest.raises(RuntimeError, match="weight versions old"):
        make_trainer(tmp_path, generator=stale).step()
    make_trainer(tmp_path, generator=stale, max_weight_lag=1).step()


# ------------------------------------------------------------------------------ loop, schedule, logs


def test_train_logs_every_step_with_the_lr_each_update_used(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=3, warmup_steps=2, lr=3e-3, mini_batch_size=8)
    history = trainer.train(progress=False)
    records = read_log(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and len(history) == 3
    # warmup multiplier (s + 1) / (warmup + 1) for update s = 0, 1, then the peak
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 2e-3, 3e-3])
    for record in records:
        for key in (
            "reward_mean",
            "reward_std",
            "valid_fraction",
            "loss",
            "kl",
            "entropy",
            "clip_fraction",
            "grad_norm",
        ):
            assert key in record
        assert record["time_step"] >= record["time_generate"] + record["time_update"]
    # two mini-batches of 8: the second update sees a policy one step away from the rollout's
    assert records[0]["approx_kl"] > 0
    assert (tmp_path / "checkpoints" / "step-000003").is_dir()  # the last step is always saved


# ------------------------------------------------------------------------------ learning


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mean_reward_rises_on_a_learnable_toy_task(tmp_path, seed):
    """Reward = share of digits in the completion: the tiny model from scratch starts near 10/300 and must
    clearly improve within 8 steps of 16 samples. Seen on seeds 0-4: last two steps at 0.5-0.95."""
    tokenizer = toy_tokenizer()
    model = toy_model(seed=seed)
    trainer = make_trainer(
        tmp_path,
        model=model,
        reward_fn=digit_reward,
        generator=HFGenerator(model, tokenizer),
        total_steps=8,
        lr=2e-3,
        max_new_tokens=10,
        seed=seed,
    )
    trainer.train(progress=False)
    rewards = [r["reward_mean"] for r in read_log(tmp_path / "train_log.jsonl")]
    assert len(rewards) == 8
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert end > 2 * start and end > start + 0.1, rewards

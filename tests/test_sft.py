"""grpo/sft.py: response-only labels, padding, the loss, learning a tiny dataset, dropped pairs, and resume."""

from __future__ import annotations

import numpy as np
import torch

from grpo.models import load_model_and_tokenizer
from grpo.optim import IndexSampler
from grpo.run_log import read_log
from grpo.sft import IGNORE_INDEX, SFTConfig, SFTTrainer, collate, response_nll, tokenize_pairs
from tests.toy import toy_model, toy_prompts, toy_tokenizer

PAIRS = [
    (p.text, answer) for p, answer in zip(toy_prompts(4), ["123", "4 5 6", "789 0", "2468"], strict=True)
]


def test_labels_cover_the_response_and_eos_only():
    tokenizer = toy_tokenizer()
    items, dropped = tokenize_pairs(tokenizer, PAIRS[:2], max_length=512)
    assert dropped == 0
    for item, (prompt, response) in zip(items, PAIRS[:2], strict=True):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        assert item.input_ids == prompt_ids + response_ids
        assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids


def test_overlong_pairs_are_dropped_and_counted(tmp_path):
    tokenizer = toy_tokenizer()
    lengths = [len(item.input_ids) for item in tokenize_pairs(tokenizer, PAIRS, max_length=10_000)[0]]
    limit = sorted(lengths)[1]  # the two shortest fit (ties aside)
    items, dropped = tokenize_pairs(tokenizer, PAIRS, max_length=limit)
    assert len(items) == sum(n <= limit for n in lengths) and dropped == sum(n > limit for n in lengths) > 0
    assert all(len(item.input_ids) <= limit for item in items)
    trainer = SFTTrainer(
        model=toy_model(),
        tokenizer=tokenizer,
        train_pairs=PAIRS,
        config=SFTConfig(max_length=limit),
        run_dir=tmp_path,
    )
    assert trainer.dropped == dropped and len(trainer.train_items) == len(items)
    assert (
        trainer.eval_items == [] and trainer.evaluate() != trainer.evaluate()
    )  # no eval pairs: NaN, no crash


def test_collate_right_pads_and_masks_padding_out_of_the_loss():
    tokenizer = toy_tokenizer()
    items, _ = tokenize_pairs(tokenizer, PAIRS[:2], max_length=512)
    batch = collate(items, tokenizer.pad_token_id)
    width = max(len(item.input_ids) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        assert batch["input_ids"][row, :n].tolist() == item.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


def test_response_nll_is_the_response_tokens_negative_log_likelihood():
    tokenizer = toy_tokenizer()
    model = toy_model().eval()
    items, _ = tokenize_pairs(tokenizer, PAIRS[:3], max_length=512)
    with torch.no_grad():
        nll, count = response_nll(model, collate(items, tokenizer.pad_token_id))
        expected, expected_count = 0.0, 0
        for item in items:  # one unpadded sequence at a time, labelled positions only
            logits = model(input_ids=torch.tensor([item.input_ids])).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for t, label in enumerate(item.labels[1:]):
                if label != IGNORE_INDEX:
                    expected -= logp[t, label].item()
                    expected_count += 1
    assert count == expected_count
    assert abs(nll.item() - expected) < 1e-5 * expected


def sft_trainer(run_dir, model=None, tokenizer=None, **overrides) -> SFTTrainer:
    settings = dict(
        total_steps=12,
        batch_size=4,
        lr=2e-3,
        warmup_steps=2,
        eval_every=100,
        checkpoint_every=100,
        log_every=1,
    )
    return SFTTrainer(
        model=model if model is not None else toy_model(),
        tokenizer=tokenizer or toy_tokenizer(),
        train_pairs=PAIRS,
        eval_pairs=PAIRS,
        config=SFTConfig(**{**settings, **overrides}),
        run_dir=run_dir,
        console_log=False,
    )


def test_eval_loss_falls_on_a_tiny_repeated_dataset(tmp_path):
    trainer = sft_trainer(tmp_path)
    before = trainer.evaluate()
    history = trainer.train(progress=False)
    after = history[-1]["eval_loss"]
    assert after < 0.5 * before, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert [r["step"] for r in read_log(tmp_path / "sft_log.jsonl")] == list(range(1, 13))


def test_sft_resume_reaches_the_same_weights(tmp_path):
    """4 steps straight vs 2 steps, a fresh process-like restart from the checkpoint, 2 more steps."""
    straight = sft_trainer(tmp_path / "a", total_steps=4, checkpoint_every=2, batch_size=3)
    straight.train(progress=False)

    first = sft_trainer(tmp_path / "b", total_steps=4, checkpoint_every=2, batch_size=3)
    for _ in range(3):  # run on past the checkpoint at 2, as a killed run would, then "die"
        metrics = first.step()
        first.logger.log(first.step_count, metrics)
        if first.step_count == 2:
            checkpoint = first.save()
    model, tokenizer = load_model_and_tokenizer(checkpoint / "model", dtype="float32")
    resumed = sft_trainer(
        tmp_path / "b", model=model, tokenizer=tokenizer, total_steps=4, checkpoint_every=2, batch_size=3
    )
    resumed.restore(checkpoint)
    resumed.train(progress=False)

    assert [r["step"] for r in read_log(tmp_path / "b" / "sft_log.jsonl")] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 140, size=100)
    plain = IndexSampler(100, seed=3)
    grouped = IndexSampler(100, seed=3, lengths=lengths, group=32)
    for epoch in range(3):
        order = grouped.order(epoch)
        assert sorted(order.tolist()) == list(range(100))  # every item once per epoch
        assert set(order[:32].tolist()) == set(plain.order(epoch)[:32].tolist())  # same random chunks
        for start in range(0, 100, 32):
            assert np.all(np.diff(lengths[order[start : start + 32]]) >= 0)  # each chunk sorted by length
    assert not np.array_equal(grouped.order(0), grouped.order(1))

    def padded_positions(sampler: IndexSampler) -> int:
        return sum(8 * int(lengths[sampler.take(8)].max()) for _ in range(50))

    assert padded_positions(IndexSampler(100, 3, lengths=lengths, group=32)) < 0.85 * padded_positions(
        IndexSampler(100, 3)
    )
    # (epoch, offset) is still the whole state: a sampler restored mid-epoch continues the same order
    first = IndexSampler(100, 3, lengths=lengths, group=32)
    first.take(40)
    resumed = IndexSampler(100, 3, lengths=lengths, group=32)
    resumed.load_state(first.state())
    assert resumed.take(90) == first.take(90)

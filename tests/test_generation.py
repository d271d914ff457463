"""grpo/generation.py and grpo/policy.py: rollout masks, the HF sampler, decoding, response log-probabilities."""

from __future__ import annotations

import copy

import pytest
import torch

from grpo.generation import HFGenerator, Rollout, SamplingConfig, decode_responses, response_mask_from_eos
from grpo.policy import batched_response_logprobs, response_logprobs
from tests.toy import toy_model, toy_prompts, toy_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


@pytest.fixture(scope="module")
def model():
    """Shared, never trained: tests that change it work on a copy."""
    return toy_model(seed=0).eval()


def manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: no cache, no padding, argmax of the plain forward pass, stop after EOS."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(token))
            if int(token) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def real_tokens(rollout: Rollout, row: int) -> list[int]:
    return rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()


# ------------------------------------------------------------------------------ response masks


def test_response_mask_covers_up_to_first_eos():
    eos = 2
    ids = torch.tensor(
        [
            [5, eos, 7, eos],  # EOS in the middle: it counts, what follows does not
            [5, 6, 7, 8],  # never stops: truncated, all tokens count
            [eos, 0, 0, 0],  # empty answer: only the EOS counts
            [5, 6, 7, eos],  # EOS on the last slot: not truncated
        ]
    )
    mask, truncated = response_mask_from_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]
    # several stop tokens: the first of any of them ends the response
    mask, truncated = response_mask_from_eos(torch.tensor([[5, 3, 2, 1], [5, 6, 7, 8]]), [2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


# ------------------------------------------------------------------------------ HF generator


def test_greedy_equals_manual_argmax_whatever_the_model_generation_defaults(model, tokenizer):
    """temperature 0 is greedy, and the checkpoint's own sampling defaults (repetition penalty, n-gram blocking,
    top-k, as Qwen2.5-Instruct ships) never reach the sampler: rollouts come from the plain model."""
    prompts = [p.text for p in toy_prompts(2)]
    with_defaults = copy.deepcopy(model)
    gen_cfg = with_defaults.generation_config
    gen_cfg.repetition_penalty, gen_cfg.no_repeat_ngram_size, gen_cfg.top_k = 5.0, 1, 3
    gen_cfg.temperature, gen_cfg.do_sample = 0.7, True
    rollout = HFGenerator(with_defaults, tokenizer).generate(
        prompts, 1, SamplingConfig(temperature=0, max_new_tokens=8)
    )
    for row, prompt in enumerate(prompts):
        assert real_tokens(rollout, row) == manual_greedy(model, tokenizer, prompt, 8)
    assert (
        with_defaults.generation_config.repetition_penalty == 5.0
    )  # the model's own config is left as it was


def test_left_padding_gives_the_same_greedy_answer_alone_and_in_a_batch(model, tokenizer):
    short, long = toy_prompts(4)[0].text, toy_prompts(4)[3].text
    assert len(tokenizer(long)["input_ids"]) > len(tokenizer(short)["input_ids"])
    generator = HFGenerator(model, tokenizer)
    sampling = SamplingConfig(temperature=0, max_new_tokens=10)
    alone = generator.generate([short], 1, sampling)
    batched = generator.generate([long, short], 1, sampling)
    assert batched.prompt_mask[1].tolist().count(0) > 0  # the short prompt really was padded
    assert batched.prompt_mask[1, -1] == 1  # ... on the left
    assert real_tokens(batched, 1) == real_tokens(alone, 0)
    assert real_tokens(batched, 0) == manual_greedy(model, tokenizer, long, 10)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tokenizer):
    generator = HFGenerator(
        model, tokenizer, batch_size=3
    )  # 8 rows in chunks of 3: one RNG stream across chunks
    prompts = [p.text for p in toy_prompts(2)]
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = generator.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=7))
    assert torch.equal(torch.rand(3), expected_next)
    again = generator.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=7))
    other = generator.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=8))
    assert torch.equal(first.response_ids, again.response_ids)
    assert not torch.equal(first.response_ids, other.response_ids)
    # prompt-major layout: rows 0-3 answer prompt 0, rows 4-7 prompt 1
    assert first.num_samples == 8
    assert torch.equal(first.prompt_ids[0], first.prompt_ids[3]) and torch.equal(
        first.prompt_ids[4], first.prompt_ids[7]
    )
    assert not torch.equal(first.prompt_ids[3], first.prompt_ids[4])
    assert len({tuple(first.response_ids[i].tolist()) for i in range(4)}) > 1  # samples of one prompt differ


def force_eos_at(model, eos_id: int, stop_at: list[int | None]):
    """Make row r emit EOS as its token number stop_at[r] (None: never), whatever is sampled before.

    The lm_head hook sees one call per new token (the first one is the prompt's prefill) and lifts the EOS logit
    of the last position by a margin no sampled token can beat, or sinks it where the row must not stop yet.
    """
    calls = [0]

    def hook(_module, _inputs, logits):
        logits = logits.clone()
        for row, stop in enumerate(stop_at):
            logits[row, -1, eos_id] = 1e4 if stop == calls[0] else -1e4
        calls[0] += 1
        return logits

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_responses_stop_at_eos_are_masked_padded_and_flagged(model, tokenizer, temperature):
    stop_at = [0, 3, None, 5]
    prompts = [p.text for p in toy_prompts(4)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    handle = force_eos_at(model, eos, stop_at)
    try:
        rollout = HFGenerator(model, tokenizer).generate(
            prompts, 1, SamplingConfig(temperature=temperature, max_new_tokens=8)
        )
    finally:
        handle.remove()
    assert rollout.response_ids.shape == (4, 8)
    for row, stop in enumerate(stop_at):
        length = 8 if stop is None else stop + 1
        assert rollout.response_mask[row].tolist() == [1] * length + [0] * (8 - length)
        assert bool(rollout.truncated[row]) is (stop is None)
        if stop is not None:
            assert rollout.response_ids[row, stop] == eos
            assert (rollout.response_ids[row, stop + 1 :] == pad).all()
        assert eos not in rollout.response_ids[row, : length - (stop is not None)].tolist()
    texts = decode_responses(tokenizer, rollout)
    assert texts[0] == ""  # an immediate EOS is an empty answer
    for row, stop in enumerate(stop_at):
        content = rollout.response_ids[row, : 8 if stop is None else stop].tolist()
        assert texts[row] == tokenizer.decode(content)
        assert "<|im_end|>" not in texts[row] and "<|endoftext|>" not in texts[row]


def test_decode_responses_drops_special_tokens_and_masked_tokens(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    hello, digits = tokenizer.encode("count 12"), tokenizer.encode(" 345")
    width = len(hello) + len(digits) + 2
    row0 = hello + [eos] + digits + [pad]  # tokens after the EOS are outside the mask
    row1 = digits + [pad] * (width - len(digits))  # truncated answer with trailing padding masked out
    ids = torch.tensor([row0, row1])
    mask = torch.tensor(
        [
            [1] * (len(hello) + 1) + [0] * (width - len(hello) - 1),
            [1] * len(digits) + [0] * (width - len(digits)),
        ]
    )
    rollout = Rollout(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long),
        prompt_mask=torch.ones(2, 1, dtype=torch.long),
        response_ids=ids,
        response_mask=mask,
        truncated=torch.tensor([False, True]),
    )
    assert decode_responses(tokenizer, rollout) == ["count 12", " 345"]


def test_overlong_prompt_keeps_its_end(model, tokenizer):
    """Truncation drops the start of a prompt, never the assistant header the answer must follow."""
    prompt = toy_prompts(1)[0].text
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generator = HFGenerator(model, tokenizer, max_prompt_tokens=len(ids) - 3)
    rollout = generator.generate([prompt], 1, SamplingConfig(temperature=0, max_new_tokens=1))
    assert rollout.prompt_ids[0].tolist() == ids[3:]


def test_rollout_carries_the_generator_weight_version(model, tokenizer):
    generator = HFGenerator(model, tokenizer)
    generator.weight_version = 5
    rollout = generator.generate([toy_prompts(1)[0].text], 2, SamplingConfig(max_new_tokens=1))
    assert rollout.weight_version == 5 and rollout.num_samples == 2


def test_generate_restores_training_mode(model, tokenizer):
    trained = copy.deepcopy(model).train()
    HFGenerator(trained, tokenizer).generate([toy_prompts(1)[0].text], 1, SamplingConfig(max_new_tokens=1))
    assert trained.training


# ------------------------------------------------------------------------------ policy log-probs


def left_padded_batch(tokenizer, pairs: list[tuple[list[int], list[int]]]):
    """prompt_ids/mask left-padded and response_ids/mask right-padded, as a Rollout lays them out."""
    pad = tokenizer.pad_token_id
    p_len = max(len(p) for p, _ in pairs)
    r_len = max(len(r) for _, r in pairs)
    prompt_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p, _ in pairs])
    prompt_mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p, _ in pairs])
    response_ids = torch.tensor([r + [pad] * (r_len - len(r)) for _, r in pairs])
    response_mask = torch.tensor([[1] * len(r) + [0] * (r_len - len(r)) for _, r in pairs])
    return prompt_ids, prompt_mask, response_ids, response_mask


def manual_log_softmax(
    model, prompt: list[int], response: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T) at every response position of one unpadded sequence, [len(response), V]."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits.double(), dim=-1)


def manual_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    dist = manual_log_softmax(model, prompt, response, temperature)
    return dist.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_of_a_padded_batch_equal_each_unpadded_sequence(model, tokenizer, temperature):
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for prompt_len, response_len in [(3, 5), (9, 2), (6, 7)]:
        prompt = torch.randint(3, len(tokenizer), (prompt_len,), generator=generator).tolist()
        response = torch.randint(3, len(tokenizer), (response_len,), generator=generator).tolist()
        pairs.append((prompt, response))
    batch = left_padded_batch(tokenizer, pairs)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, *batch, temperature=temperature, with_entropy=True)
    assert logprobs.shape == entropy.shape == batch[2].shape
    for row, (prompt, response) in enumerate(pairs):
        expected = manual_logprobs(model, prompt, response, temperature)
        torch.testing.assert_close(logprobs[row, : len(response)].double(), expected, atol=2e-5, rtol=1e-5)
    assert (entropy[batch[3].bool()] > 0).all()
    assert (entropy <= torch.log(torch.tensor(float(len(tokenizer)))) + 1e-4).all()

    rollout = Rollout(*batch, truncated=torch.zeros(3, dtype=torch.bool))
    trained = copy.deepcopy(model).train()
    chunked = batched_response_logprobs(trained, rollout, micro_batch_size=2, temperature=temperature)
    assert trained.training  # restored after the no-grad passes
    torch.testing.assert_close(chunked, logprobs, atol=2e-5, rtol=1e-5)


def test_greedy_rollout_scores_its_tokens_as_the_most_likely(model, tokenizer):
    """Generator and scorer agree: each greedy token is the argmax of the distribution response_logprobs uses."""
    rollout = HFGenerator(model, tokenizer).generate(
        [p.text for p in toy_prompts(3)], 1, SamplingConfig(temperature=0, max_new_tokens=6)
    )
    with torch.no_grad():
        logprobs, _ = response_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
    for row in range(3):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        response = real_tokens(rollout, row)
        best = manual_log_softmax(model, prompt, response).amax(-1)
        torch.testing.assert_close(logprobs[row, : len(response)].double(), best, atol=2e-5, rtol=1e-5)


def test_min_new_tokens_defers_eos_and_the_scorer_uses_the_distribution_that_sampled(model, tokenizer):
    """With min_new_tokens = 4 the rows forced to stop at tokens 0 and 3 go on (EOS masked there), the row
    forced at 5 stops at 5; the rollout's masks drop EOS from the first 4 positions only, and the log-probs
    scored with them are log softmax over the vocabulary without EOS (what the sampler drew from)."""
    eos = tokenizer.eos_token_id
    handle = force_eos_at(model, eos, [0, 3, None, 5])
    try:
        rollout = HFGenerator(model, tokenizer).generate(
            [p.text for p in toy_prompts(4)], 1, SamplingConfig(max_new_tokens=8, min_new_tokens=4, seed=1)
        )
    finally:
        handle.remove()
    assert rollout.response_mask.sum(1).tolist() == [8, 8, 8, 6]
    assert (rollout.response_ids[:, :4] != eos).all() and rollout.response_ids[3, 5] == eos
    allowed = rollout.masks.allowed()
    assert not allowed[:, :4, eos].any() and allowed[:, 4:].all()
    assert allowed[:, :4].sum(-1).eq(allowed.shape[-1] - 1).all()  # EOS alone is left out
    with torch.no_grad():
        logprobs, _ = response_logprobs(model, *astuple_rollout(rollout), masks=rollout.masks)
    for row in range(4):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        response = real_tokens(rollout, row)
        dist = manual_log_softmax(model, prompt, response)
        dist[:4, eos] = float("-inf")
        expected = torch.log_softmax(dist, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs[row, : len(response)].double(), expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)


def astuple_rollout(rollout: Rollout) -> tuple[torch.Tensor, ...]:
    return rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask


def test_entropy_for_the_log_only_has_no_graph_and_the_same_value(model, tokenizer):
    batch = left_padded_batch(tokenizer, [([5, 6, 7], [8, 9]), ([10], [11, 12])])
    trained = copy.deepcopy(model).train()
    logprobs, with_graph = response_logprobs(trained, *batch, with_entropy=True)
    _, for_log = response_logprobs(trained, *batch, with_entropy=True, entropy_grad=False)
    assert logprobs.requires_grad and with_graph.requires_grad and not for_log.requires_grad
    torch.testing.assert_close(for_log, with_graph.detach())


def test_bfloat16_compute_samples_in_bfloat16_over_float32_weights(model, tokenizer):
    dtypes = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, out: dtypes.append(out.dtype)
    )
    try:
        generator = HFGenerator(model, tokenizer, compute_dtype=torch.bfloat16)
        rollout = generator.generate(
            [toy_prompts(1)[0].text], 2, SamplingConfig(max_new_tokens=3, min_new_tokens=3)
        )
    finally:
        handle.remove()
    assert rollout.response_mask.sum() == 6 and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the call

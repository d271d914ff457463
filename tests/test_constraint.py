"""grpo/constraint.py and what builds on it: packed token masks, the masks HF sampling records equal the replayed
ones, the masked log-softmax (values, gradients, entropy), forced tokens left out of the GRPO loss, constrained
GRPO steps end to end, and dynamic sampling (drop_zero_std_groups)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from crystals.grammar import structure_grammar
from grpo.advantages import group_advantages
from grpo.constraint import BITS, ConstraintError, GrammarConstraint, TokenMasks, concat_masks, unpack_bitmask
from grpo.generation import (
    HFGenerator,
    Rollout,
    SamplingConfig,
    concat_rollouts,
    decode_responses,
    output_vocab_size,
)
from grpo.losses import policy_loss
from grpo.policy import concat_prompt_response, response_logprobs
from grpo.trainer import GRPOConfig, GRPOTrainer, PromptItem, trainable_tokens, zero_std_groups
from pipeline.config import RunConfig
from pipeline.runs import initial_model_source
from tests.test_trainer import (
    GROUP,
    FixedGenerator,
    fixed_rollout,
    grads_and_weights,
    index_reward,
    make_trainer,
)
from tests.toy import toy_model, toy_prompts, toy_tokenizer

# ------------------------------------------------------------------------------ helpers


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [..., V] -> int32 [..., ceil(V / 32)], by hand: token v is bit v % 32 of word v // 32."""
    *lead, vocab = allowed.shape
    words = (vocab + BITS - 1) // BITS
    out = []
    for row in allowed.reshape(-1, vocab).tolist():
        packed = [0] * words
        for v, bit in enumerate(row):
            if bit:
                packed[v // BITS] |= 1 << (v % BITS)
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in packed])  # the same bits as int32
    return torch.tensor(out, dtype=torch.int32).reshape(*lead, words)


def one_hot_set(tokens, vocab: int) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[list(tokens)] = True
    return mask


def masks_from_sets(sets: list[list[set[int] | None]], vocab: int) -> TokenMasks:
    """TokenMasks of per-row, per-position allowed sets (None: every token), rows padded with "every token"."""
    words = (vocab + BITS - 1) // BITS
    table, ids = [torch.full((words,), -1, dtype=torch.int32)], {}
    width = max(len(row) for row in sets)
    index = torch.zeros((len(sets), width), dtype=torch.long)
    for r, row in enumerate(sets):
        for t, allowed in enumerate(row):
            if allowed is None:
                continue
            key = tuple(sorted(allowed))
            if key not in ids:
                ids[key] = len(table)
                table.append(pack(one_hot_set(allowed, vocab)))
            index[r, t] = ids[key]
    return TokenMasks(index, torch.stack(table), vocab)


# Position kinds of the constrained toy rollout: 0 free, 1 forced (the sampled token only), 2 three tokens,
# 3 ten tokens; each set holds the sampled token.
FREE, FORCED, THREE, TEN = range(4)
FULLY_FORCED_ROW = 3


def constrained_rollout(vocab: int, seed: int = 0) -> tuple[Rollout, torch.Tensor]:
    """tests/test_trainer.py's fixed rollout (16 rows, row 5 empty) with masks holding every sampled token;
    row 3 is forced throughout. Returns the rollout and the kind of each position."""
    rollout = fixed_rollout(vocab, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    n, r_len = rollout.response_ids.shape
    kinds = (torch.arange(n)[:, None] + torch.arange(r_len)[None, :]) % 4
    kinds[FULLY_FORCED_ROW] = FORCED
    sets = []
    for r in range(n):
        row = []
        for t in range(r_len):
            y, kind = int(rollout.response_ids[r, t]), int(kinds[r, t])
            if kind == FREE:
                row.append(None)
            elif kind == FORCED:
                row.append({y})
            elif kind == THREE:
                row.append({y, (y + 1) % vocab, (y + 2) % vocab})
            else:
                others = torch.randperm(vocab, generator=g)[:12].tolist()
                row.append({y, *[v for v in others if v != y][:9]})
        sets.append(row)
    rollout.masks = masks_from_sets(sets, vocab)
    return rollout, kinds


# ------------------------------------------------------------------------------ packed masks


def test_unpack_bitmask_reads_bit_v_mod_32_of_word_v_div_32():
    """Against a bit-by-bit reading of the int32 words, sign bit included; bits past vocab_size are dropped;
    and it inverts a hand-written packing."""
    g = torch.Generator().manual_seed(0)
    vocab = 70  # three words, the last one only partly inside the vocabulary
    words = torch.randint(-(2**31), 2**31 - 1, (5, 3), generator=g, dtype=torch.int64).to(torch.int32)
    words[0], words[1] = -1, 0
    words[2] = torch.tensor([-(2**31), 1, 1 << 6], dtype=torch.int32)  # bits 31, 32 and 70 (past the vocab)
    unpacked = unpack_bitmask(words, vocab)
    assert unpacked.shape == (5, vocab) and unpacked.dtype == torch.bool
    for r in range(5):
        for v in range(vocab):
            bit = ((int(words[r, v // 32]) & 0xFFFFFFFF) >> (v % 32)) & 1
            assert bool(unpacked[r, v]) == bool(bit), (r, v)
    assert unpacked[0].all() and not unpacked[1].any()
    assert unpacked[2].nonzero().flatten().tolist() == [31, 32]
    allowed = torch.rand((2, 3, vocab), generator=g) < 0.3
    assert torch.equal(unpack_bitmask(pack(allowed), vocab), allowed)


def test_token_masks_allowed_forced_and_rows():
    vocab = 40
    sets = [None, {7}, {3, 5}, {39}, set(range(1, 40))]
    table = torch.stack(
        [torch.full((2,), -1, dtype=torch.int32)] + [pack(one_hot_set(s, vocab)) for s in sets[1:]]
    )
    table[1, 1] |= 1 << 13  # token 45 does not exist: entry 1 still allows one token
    index = torch.tensor([[0, 1, 2, 3], [4, 1, 0, 0], [2, 2, 1, 3]])
    masks = TokenMasks(index, table, vocab)
    allowed = masks.allowed()
    assert allowed.shape == (3, 4, vocab)
    for r in range(3):
        for t in range(4):
            expected = set(range(vocab)) if sets[index[r, t]] is None else sets[index[r, t]]
            assert set(allowed[r, t].nonzero().flatten().tolist()) == expected
    assert masks.forced().tolist() == [
        [False, True, False, True],
        [False, True, False, False],
        [False, False, True, True],
    ]
    part = masks.rows(torch.tensor([2, 0]))
    assert part.table is masks.table and part.vocab_size == vocab
    assert torch.equal(part.allowed(), allowed[[2, 0]]) and torch.equal(part.forced(), masks.forced()[[2, 0]])
    assert torch.equal(masks.rows(slice(1, 3)).index, index[1:3])


def test_concat_masks_merges_tables_and_pads_with_everything_allowed():
    vocab = 37
    a = masks_from_sets([[{1}, {2, 3}, None]], vocab)
    b = masks_from_sets([[{2, 3}, {4}], [{5}, None]], vocab)
    merged = concat_masks([a, None, b], 4, rows=[1, 2, 2])
    everything = torch.ones(vocab, dtype=torch.bool)
    expected = torch.stack(
        [
            torch.stack([one_hot_set({1}, vocab), one_hot_set({2, 3}, vocab), everything, everything]),
            everything.expand(4, vocab),  # the unconstrained part
            everything.expand(4, vocab),
            torch.stack([one_hot_set({2, 3}, vocab), one_hot_set({4}, vocab), everything, everything]),
            torch.stack([one_hot_set({5}, vocab), everything, everything, everything]),
        ]
    )
    assert torch.equal(merged.allowed(), expected)
    assert merged.table.shape[0] == 5  # everything, {1}, {2, 3} (shared by both parts), {4}, {5}
    assert torch.equal(concat_masks([b], 1).allowed(), expected[3:, :1])  # shorter: cut
    with pytest.raises(ValueError, match="no masks"):
        concat_masks([None, None], 3, rows=[1, 1])


def test_select_and_concat_rollouts_keep_each_rows_masks():
    vocab = 33
    masks = masks_from_sets([[{1}, {2}], [{3}, {4, 5}], [None, {6}]], vocab)
    constrained = Rollout(
        prompt_ids=torch.ones((3, 2), dtype=torch.long),
        prompt_mask=torch.ones((3, 2), dtype=torch.long),
        response_ids=torch.tensor([[1, 2], [3, 4], [7, 6]]),
        response_mask=torch.ones((3, 2), dtype=torch.long),
        truncated=torch.zeros(3, dtype=torch.bool),
        masks=masks,
    )
    free = Rollout(
        prompt_ids=torch.ones((1, 4), dtype=torch.long),
        prompt_mask=torch.ones((1, 4), dtype=torch.long),
        response_ids=torch.ones((1, 5), dtype=torch.long),
        response_mask=torch.ones((1, 5), dtype=torch.long),
        truncated=torch.zeros(1, dtype=torch.bool),
    )
    merged = concat_rollouts([constrained.select(torch.tensor([2, 1])), free])
    allowed = merged.masks.allowed()
    assert allowed.shape == (3, 5, vocab)
    assert torch.equal(allowed[0, :2], masks.allowed()[2]) and torch.equal(allowed[1, :2], masks.allowed()[1])
    assert allowed[:2, 2:].all() and allowed[2].all()
    assert concat_rollouts([free, free]).masks is None


# ------------------------------------------------------------------------------ grammar masks: HF and replay


@pytest.fixture(scope="module")
def crystal_model(tmp_path_factory):
    """The untrained tiny crystal model (random weights) and its crystal-text tokenizer."""
    from grpo.models import load_model_and_tokenizer

    run = RunConfig(model="tiny", structure_layout="lines", train_limit=300)
    source = initial_model_source(run, tmp_path_factory.mktemp("crystal"))
    model, tokenizer = load_model_and_tokenizer(source, dtype="float32")
    return model.eval(), tokenizer


def test_masks_recorded_while_sampling_equal_the_replayed_masks(crystal_model):
    """HFGenerator's masks (recorded by the logits processor, in two chunks of different lengths, one prompt
    unconstrained) are, at every position inside the response mask, exactly the allowed sets that
    GrammarConstraint.replay finds for the sampled tokens; every sampled token is in its set."""
    model, tokenizer = crystal_model
    specs = [
        structure_grammar("formula", "NaCl", max_atoms=4),
        None,
        structure_grammar("elements", "SiO2", max_atoms=4),
    ]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f}], add_generation_prompt=True, tokenize=False
        )
        for f in ("NaCl", "LiF", "SiO2")
    ]
    n = 2
    rollout = HFGenerator(model, tokenizer, batch_size=4).generate(
        prompts, n, SamplingConfig(max_new_tokens=40, seed=2), specs
    )
    row_specs = [spec for spec in specs for _ in range(n)]
    replayed = GrammarConstraint(tokenizer, output_vocab_size(model)).replay(
        row_specs, rollout.response_ids, rollout.response_mask
    )
    inside = rollout.response_mask.bool()
    recorded = rollout.masks.allowed()
    assert recorded.shape == (*rollout.response_ids.shape, output_vocab_size(model))
    assert torch.equal(recorded[inside], replayed.allowed()[inside])
    taken = recorded.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    assert taken[inside].all()
    constrained = torch.tensor([spec is not None for spec in row_specs])
    assert recorded[~constrained].all()  # the unconstrained prompt's rows
    # under a grammar, never "anything goes"
    assert not recorded[constrained][inside[constrained]].all(-1).any()
    assert not rollout.truncated[constrained].any()


NACL = "5.6 5.6 5.6 60 60 60\nNa 0.00 0.00 0.00\nCl 0.50 0.50 0.50"


def test_replay_raises_for_a_token_the_grammar_forbids(crystal_model):
    """A response its grammar forbids (EOS right after the lattice, a wrong element) is a ConstraintError
    naming the row; an unconstrained row may hold anything; a padded vocabulary's extra ids are never allowed."""
    _, tokenizer = crystal_model
    eos = tokenizer.eos_token_id
    spec = structure_grammar("formula", "NaCl")
    constraint = GrammarConstraint(tokenizer, len(tokenizer) + 40)
    assert constraint.words == math.ceil((len(tokenizer) + 40) / 32)

    def replay(texts, specs):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return constraint.replay(specs, ids, mask), mask

    masks, mask = replay([NACL, "anything at all"], [spec, None])
    allowed = masks.allowed()
    assert not allowed[0][mask[0].bool()][:, len(tokenizer) :].any()
    assert allowed[1].all()
    lattice = NACL.split("\n")[0]
    for bad in (
        lattice,
        NACL.replace("Cl", "Na"),
        NACL + "\nNa 0.10 0.10 0.10",
        NACL.replace("0.50", "1.50"),
    ):
        with pytest.raises(ConstraintError, match="row 1"):
            replay([NACL, bad], [spec, spec])


# ------------------------------------------------------------------------------ masked log-softmax


@pytest.fixture(scope="module")
def base_model():
    """toy_model(seed=0), built once: tests that train it work on a copy."""
    return toy_model(seed=0)


@pytest.fixture(scope="module")
def toy():
    tokenizer = toy_tokenizer()
    rollout, kinds = constrained_rollout(len(tokenizer))
    return tokenizer, rollout, kinds


def manual_masked_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax over the allowed tokens, with -inf elsewhere, of the full forward's response logits."""
    input_ids, attention_mask, position_ids = concat_prompt_response(
        rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
    )
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    p_len, r_len = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    z = logits[:, p_len - 1 : p_len - 1 + r_len] / temperature
    z = z.masked_fill(~rollout.masks.allowed(), float("-inf"))
    return z.log_softmax(-1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)


def scored(model, rollout: Rollout, masks=None, **kwargs):
    return response_logprobs(
        model,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.response_ids,
        rollout.response_mask,
        masks=masks,
        **kwargs,
    )


class StoredElsewhere(torch.nn.Module):
    """A model whose weights are kept on one device and whose logits come out on another, as an FSDP2 model
    offloaded to host memory does on a GPU (shards on the CPU, compute on the GPU). The meta device stands for
    where the weights are kept, so the inputs arrive there as data-less tensors; the forward runs `model` on
    the CPU over `rollout`'s own rows, the same forward that response_logprobs asks for."""

    def __init__(self, model, rollout: Rollout):
        super().__init__()
        self.model = model
        self.rows = concat_prompt_response(
            rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
        self.response_len = rollout.response_ids.shape[1]
        self.stored = torch.nn.Parameter(torch.zeros(1, device="meta"))

    def parameters(self, recurse: bool = True):
        yield self.stored

    def forward(self, **meta_inputs):
        input_ids, attention_mask, position_ids = self.rows
        total_len = input_ids.shape[1]
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.arange(total_len - self.response_len - 1, total_len - 1),
        )


def test_masked_logprobs_are_taken_where_the_model_computes_not_where_it_keeps_its_weights(toy, base_model):
    _, rollout, _ = toy
    model = copy.deepcopy(base_model).eval()
    with torch.no_grad():
        expected, _ = scored(model, rollout, rollout.masks)
        offloaded, _ = scored(StoredElsewhere(model, rollout), rollout, rollout.masks)
    assert offloaded.device.type == "cpu"
    torch.testing.assert_close(offloaded, expected, atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_masked_logprobs_are_the_log_softmax_over_the_allowed_tokens(toy, base_model, temperature):
    _, rollout, kinds = toy
    model = copy.deepcopy(base_model).eval()
    with torch.no_grad():
        masked, _ = scored(model, rollout, rollout.masks, temperature=temperature)
        expected = manual_masked_logprobs(model, rollout, temperature)
        plain, _ = scored(model, rollout, temperature=temperature)
    inside = rollout.response_mask.bool()
    torch.testing.assert_close(masked[inside], expected[inside], atol=1e-5, rtol=0)
    forced = inside & (kinds == FORCED)
    assert (masked[forced] == 0.0).all()  # exactly: the only allowed token
    free = inside & (kinds == FREE)
    torch.testing.assert_close(masked[free], plain[free], atol=1e-6, rtol=0)  # unconstrained: unchanged
    # a small allowed set concentrates the mass: log-probs well above the unconstrained ones
    assert (masked[inside & (kinds == THREE)] > plain[inside & (kinds == THREE)] + 1.0).all()


def test_no_gradient_reaches_a_disallowed_logit_and_forced_tokens_have_none(toy, base_model):
    """The response logits (captured at the output layer) get exactly zero gradient wherever their token is
    disallowed, and at a forced position on every token, while allowed logits of a real choice do get one."""
    _, rollout, kinds = toy
    model = copy.deepcopy(base_model)
    captured = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = model.lm_head.register_forward_hook(keep)
    try:
        logprobs, _ = scored(model, rollout, rollout.masks, temperature=0.7)
    finally:
        handle.remove()
    (logprobs * rollout.response_mask).sum().backward()
    r_len = rollout.response_ids.shape[1]
    grad = captured[0].grad[:, :r_len]  # the logits scoring the response
    allowed = rollout.masks.allowed()
    assert (grad[~allowed] == 0).all()
    inside = rollout.response_mask.bool()
    forced = inside & (kinds == FORCED)
    assert (grad[forced] == 0).all() and (logprobs[forced] == 0).all()
    choice = inside & (kinds >= THREE)
    assert (grad[choice].abs().amax(-1) > 0).all()


def test_a_policy_gradient_step_moves_no_probability_onto_disallowed_tokens(toy, base_model):
    """The constrained distribution at one position, read off response_logprobs for every token in turn: all
    its mass is on the ten allowed tokens before and after an SGD step on the masked policy loss, the step does
    change how it spreads over them, and the disallowed tokens keep probability exactly 0 (though the
    unconstrained model gives them mass)."""
    _, rollout, kinds = toy
    model = copy.deepcopy(base_model)
    inside = rollout.response_mask.bool()
    row, t = [(int(r), int(c)) for r, c in (inside & (kinds == TEN)).nonzero()][0]
    allowed_here = rollout.masks.allowed()[row, t]
    assert int(allowed_here.sum()) == 10 and len(allowed_here) > 100

    # the ten allowed tokens and twenty disallowed ones
    tokens = torch.cat([allowed_here.nonzero().flatten(), (~allowed_here).nonzero().flatten()[::14][:20]])
    allowed_here = allowed_here[tokens]
    k = len(tokens)

    def distribution(masks) -> torch.Tensor:
        """The probability of each of `tokens` at (row, t)."""
        ids = rollout.response_ids[row].repeat(k, 1)
        ids[:, t] = tokens  # the logits at t do not depend on token t itself
        with torch.no_grad():
            logprobs, _ = response_logprobs(
                model,
                rollout.prompt_ids[row].repeat(k, 1),
                rollout.prompt_mask[row].repeat(k, 1),
                ids,
                rollout.response_mask[row].repeat(k, 1),
                masks=None if masks is None else masks.rows([row] * k),
            )
        return logprobs[:, t].exp()

    before = distribution(rollout.masks)
    assert (distribution(None)[~allowed_here] > 0).all()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    advantages = torch.linspace(-1.0, 1.0, rollout.num_samples)
    logprobs, _ = scored(model, rollout, rollout.masks)
    loss = -(advantages[:, None] * logprobs * rollout.response_mask).sum() / rollout.response_mask.sum()
    loss.backward()
    optimizer.step()
    after = distribution(rollout.masks)
    for probs in (before, after):
        assert (probs[~allowed_here] == 0).all()
        torch.testing.assert_close(probs.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (after[allowed_here] - before[allowed_here]).abs().max() > 1e-4


def test_entropy_under_masks_is_that_of_the_constrained_distribution_and_finite(toy, base_model):
    """No NaN from 0 * (lowest logit): the entropy is finite, 0 at forced positions, at most log 3 on a
    three-token set, equal to the masked softmax's; its gradient is finite too."""
    _, rollout, kinds = toy
    model = copy.deepcopy(base_model)
    _, entropy = scored(model, rollout, rollout.masks, with_entropy=True)
    assert torch.isfinite(entropy).all()
    inside = rollout.response_mask.bool()
    with torch.no_grad():
        input_ids, attention_mask, position_ids = concat_prompt_response(
            rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        p_len, r_len = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
        allowed = rollout.masks.allowed()
        logp = logits[:, p_len - 1 : p_len - 1 + r_len].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        expected = -torch.where(allowed, logp.exp() * logp, torch.zeros(())).sum(-1)
    torch.testing.assert_close(entropy.detach()[inside], expected[inside], atol=1e-5, rtol=0)
    assert (entropy[inside & (kinds == FORCED)].abs() < 1e-6).all()
    assert (entropy[inside & (kinds == THREE)] <= math.log(3) + 1e-5).all()
    (entropy * rollout.response_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------ forced tokens and the loss


def test_trainable_tokens_are_the_response_minus_its_forced_tokens(toy):
    _, rollout, kinds = toy
    expected = rollout.response_mask * (kinds != FORCED).long()
    assert torch.equal(trainable_tokens(rollout), expected)
    assert trainable_tokens(rollout)[FULLY_FORCED_ROW].sum() == 0
    assert 0 < expected.sum() < rollout.response_mask.sum()
    unconstrained = copy.copy(rollout)
    unconstrained.masks = None
    assert torch.equal(trainable_tokens(unconstrained), rollout.response_mask)


def test_forced_tokens_carry_no_policy_gradient(toy, base_model):
    """A policy loss over forced tokens only: ratio 1, so its value is -mean(A) (which is why they must stay
    out of the normalisers), and its gradient is exactly zero on every parameter."""
    _, rollout, kinds = toy
    model = copy.deepcopy(base_model)
    logprobs, _ = scored(model, rollout, rollout.masks)
    forced = (rollout.response_mask.bool() & (kinds == FORCED)).long()
    advantages = torch.linspace(-1.0, 2.0, rollout.num_samples)
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, forced)
    expected = -(advantages[:, None] * forced).sum() / forced.sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("loss_agg", "micro"),
    [("token-mean", 3), ("seq-mean-token-mean", 16), ("seq-mean-token-sum-norm", 2)],
)
def test_a_constrained_grpo_update_leaves_forced_tokens_out(tmp_path, toy, base_model, loss_agg, micro):
    """The trainer's gradient on a constrained rollout (micro-batched or not) is the policy loss over the
    unforced tokens only, the fully forced row not counting as a sequence; counting the forced tokens would
    give another gradient. forced_fraction is the share of forced response tokens."""
    _, rollout, kinds = toy
    model = base_model
    generator = FixedGenerator(rollout)
    trainer = make_trainer(
        tmp_path,
        model=copy.deepcopy(model),
        generator=generator,
        loss_agg=loss_agg,
        micro_batch_size=micro,
        max_grad_norm=1e9,
    )
    metrics = trainer.step()
    grads = grads_and_weights(trainer)[0]
    inside = rollout.response_mask.bool()
    assert metrics["forced_fraction"] == pytest.approx(
        float((inside & (kinds == FORCED)).sum() / inside.sum())
    )

    rewards, _ = index_reward(None, [""] * rollout.num_samples)
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64), GROUP).float()

    def reference(mask: torch.Tensor) -> dict[str, torch.Tensor]:
        ref = copy.deepcopy(model)
        logprobs, _ = scored(ref, rollout, rollout.masks)
        loss, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, agg=loss_agg, max_len=7)
        loss.backward()
        return {k: p.grad for k, p in ref.named_parameters()}

    unforced = reference(rollout.response_mask * (kinds != FORCED).long())
    for name, grad in unforced.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-4)
    counted = reference(rollout.response_mask)
    gap = max((counted[k] - grads[k]).abs().max().item() for k in grads)
    assert gap > 1e-3 * max(g.abs().max().item() for g in grads.values())


# ------------------------------------------------------------------------------ constrained GRPO end to end

DIGITS = 'root ::= "12" [0-9]{1,4}'  # toy tokenizer: digits are single tokens, so "1" and "2" are forced


class Recording:
    """An HFGenerator that keeps every call's prompts, constraints and rollout."""

    def __init__(self, generator: HFGenerator):
        self.inner, self.calls = generator, []

    @property
    def weight_version(self):
        return self.inner.weight_version

    @weight_version.setter
    def weight_version(self, value):
        self.inner.weight_version = value

    def generate(self, prompts, n, sampling, constraints=None):
        rollout = self.inner.generate(prompts, n, sampling, constraints)
        self.calls.append((list(prompts), constraints, rollout))
        return rollout


def test_constrained_grpo_steps_sample_under_each_prompts_grammar(tmp_path):
    """PromptItem.constraint reaches the generator per prompt; HF samples of constrained prompts obey the
    grammar, the unconstrained prompt's rows are free; two steps train, and forced_fraction and
    frac_reward_zero_std are those of the sampled rollouts."""
    tokenizer = toy_tokenizer()
    model = toy_model(seed=0)
    prompts = toy_prompts(4)
    for item in prompts[:3]:
        item.constraint = DIGITS
    constraint_of = {item.text: item.constraint for item in prompts}
    generator = Recording(HFGenerator(model, tokenizer))
    rewards_seen = []

    def length_reward(metas, texts):
        rewards = [float(len(t)) for t in texts]
        rewards_seen.append(rewards)
        return rewards, [{} for _ in texts]

    trainer = GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=generator,
        prompts=prompts,
        reward_fn=length_reward,
        config=GRPOConfig(
            total_steps=2,
            prompts_per_step=2,
            group_size=GROUP,
            micro_batch_size=16,
            lr=1e-3,
            kl_coef=0.0,
            max_new_tokens=7,
            checkpoint_every=100,
        ),
        run_dir=tmp_path,
        console_log=False,
    )
    history = trainer.train(progress=False)
    assert len(history) == 2 and len(generator.calls) == 2
    assert sorted(p for texts, _, _ in generator.calls for p in texts) == sorted(constraint_of)  # one epoch
    for (texts, constraints, rollout), metrics, rewards in zip(
        generator.calls, history, rewards_seen, strict=True
    ):
        assert constraints == [constraint_of[t] for t in texts]
        decoded = decode_responses(tokenizer, rollout)
        forced = rollout.masks.forced()
        for row, text in enumerate(decoded):
            if constraints[row // GROUP] is not None:
                assert re.fullmatch(r"12[0-9]{1,4}", text), text
                assert forced[row, :2].all()
            else:
                assert not forced[row].any()
        inside = rollout.response_mask.bool()
        assert metrics["forced_fraction"] == pytest.approx(float((forced & inside).sum() / inside.sum()))
        assert metrics["forced_fraction"] > 0
        equal = zero_std_groups(torch.tensor(rewards, dtype=torch.float64), GROUP).float().mean().item()
        assert metrics["frac_reward_zero_std"] == pytest.approx(equal)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        assert "dropped_groups" not in metrics  # dynamic sampling is off
    assert trainer.step_count == 2


# ------------------------------------------------------------------------------ dynamic sampling


def test_zero_std_groups_flags_groups_of_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1e-9])
    assert zero_std_groups(rewards, 3).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="max_sampling_rounds"):
        GRPOConfig(max_sampling_rounds=0)


class CodedGenerator:
    """Rollouts without a model: response token 0 of each row is its prompt's code (3 + prompt index), forced
    by the rollout's masks; the other tokens are random, and the response length changes from call to call."""

    def __init__(self, prompts: list[PromptItem], vocab: int):
        self.code = {p.text: 3 + p.meta["index"] for p in prompts}
        self.vocab, self.weight_version, self.calls = vocab, 0, []

    def generate(self, prompts, n, sampling, constraints=None) -> Rollout:
        codes = [self.code[p] for p in prompts]
        self.calls.append(codes)
        rows, r_len = len(prompts) * n, 3 + len(self.calls) % 3
        g = torch.Generator().manual_seed(sampling.seed)
        row_codes = torch.tensor(codes).repeat_interleave(n)
        response_ids = torch.randint(3, self.vocab, (rows, r_len), generator=g)
        response_ids[:, 0] = row_codes
        return Rollout(
            prompt_ids=row_codes[:, None].repeat(1, 2 + len(self.calls) % 2),
            prompt_mask=torch.ones((rows, 2 + len(self.calls) % 2), dtype=torch.long),
            response_ids=response_ids,
            response_mask=torch.ones((rows, r_len), dtype=torch.long),
            truncated=torch.zeros(rows, dtype=torch.bool),
            weight_version=self.weight_version,
            masks=masks_from_sets([[{int(c)}] + [None] * (r_len - 1) for c in row_codes], self.vocab),
        )


def informative(index: int) -> bool:
    return index % 4 == 1


def prompt_reward(metas, texts):
    """Unequal rewards within a group only for prompts 1 and 5; every other group's rewards are all 1."""
    rewards = [float(i % 3) if informative(m["index"]) else 1.0 for i, m in enumerate(metas)]
    return rewards, [{} for _ in texts]


def dynamic_trainer(tmp_path, reward_fn=prompt_reward, **overrides):
    tokenizer = toy_tokenizer()
    prompts = toy_prompts(8)
    generator = CodedGenerator(prompts, len(tokenizer))
    settings = dict(
        total_steps=10,
        prompts_per_step=2,
        group_size=GROUP,
        micro_batch_size=16,
        lr=1e-3,
        kl_coef=0.0,
        max_new_tokens=7,
        checkpoint_every=100,
        drop_zero_std_groups=True,
        max_sampling_rounds=4,
    )
    trainer = GRPOTrainer(
        model=toy_model(seed=0),
        tokenizer=tokenizer,
        generator=generator,
        prompts=prompts,
        reward_fn=reward_fn,
        config=GRPOConfig(**{**settings, **overrides}),
        run_dir=tmp_path,
        console_log=False,
    )
    updates = []
    update = trainer._update

    def capture(rollout, advantages, old_logprobs, ref_logprobs):
        updates.append((rollout, advantages))
        return update(rollout, advantages, old_logprobs, ref_logprobs)

    trainer._update = capture
    return trainer, generator, updates


@pytest.mark.parametrize("max_rounds", [4, 2])
def test_dropping_zero_std_groups_refills_the_step_with_informative_groups(tmp_path, max_rounds):
    """Rounds of 2 prompts, 2 of 8 prompts informative: each step keeps the informative groups in the order
    sampled, up to prompts_per_step, in at most max_sampling_rounds rounds; it reports the rounds, the
    dropped and kept groups and the first round's share of equal-reward groups; the kept rows keep their
    masks (merged over rounds of different lengths) and have non-zero advantages."""
    trainer, generator, updates = dynamic_trainer(tmp_path, max_sampling_rounds=max_rounds)
    for step in range(2):
        start = len(generator.calls)
        metrics = trainer.step()
        rounds = generator.calls[start:]
        kept, dropped = [], 0
        for codes in rounds:  # what the step should have done with what it sampled
            dropped += sum(not informative(c - 3) for c in codes)
            kept += [c for c in codes if informative(c - 3)][: 2 - len(kept)]
        assert 1 <= len(rounds) <= max_rounds
        assert len(kept) == 2 or len(rounds) == max_rounds  # stops as soon as the step is full
        assert metrics["sampling_rounds"] == len(rounds)
        assert metrics["dropped_groups"] == dropped and metrics["kept_groups"] == len(kept)
        assert metrics["frac_reward_zero_std"] == pytest.approx(
            sum(not informative(c - 3) for c in rounds[0]) / 2
        )
        rollout, advantages = updates[step]
        if not kept:  # nothing informative: the first round, a step with zero advantages
            assert rollout.response_ids[::GROUP, 0].tolist() == rounds[0]
            continue
        assert rollout.num_samples == len(kept) * GROUP
        groups = rollout.response_ids[:, 0].view(-1, GROUP)
        assert groups[:, 0].tolist() == kept and (groups == groups[:, :1]).all()
        allowed = rollout.masks.allowed()
        for row in range(rollout.num_samples):
            assert allowed[row, 0].nonzero().flatten().tolist() == [int(rollout.response_ids[row, 0])]
            assert allowed[row, 1:][rollout.response_mask[row, 1:].bool()].all()
        assert (advantages.view(-1, GROUP).abs().amax(dim=1) > 0).all()
        assert metrics["forced_fraction"] == pytest.approx(
            float(rollout.num_samples / rollout.response_mask.sum())
        )


def test_dynamic_sampling_gives_up_after_max_sampling_rounds(tmp_path):
    """When no group has a signal, the step samples max_sampling_rounds rounds, drops them all and trains on
    the first round: zero advantages, so no gradient."""
    trainer, generator, updates = dynamic_trainer(
        tmp_path,
        reward_fn=lambda metas, texts: ([1.0] * len(texts), [{}] * len(texts)),
        max_sampling_rounds=3,
    )
    metrics = trainer.step()
    assert len(generator.calls) == 3
    assert metrics["sampling_rounds"] == 3 and metrics["dropped_groups"] == 6 and metrics["kept_groups"] == 0
    assert metrics["frac_reward_zero_std"] == 1.0
    rollout, advantages = updates[0]
    assert rollout.response_ids[::GROUP, 0].tolist() == generator.calls[0]
    assert (advantages == 0).all() and metrics["grad_norm"] == 0.0

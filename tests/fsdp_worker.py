"""The sharded side of tests/test_fsdp.py: GRPO on the toy model, FSDP2-sharded over gloo processes on the CPU.

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT -m tests.fsdp_worker OUT CKPT BASE

One launch (each costs seconds of process start and imports) does it all:
  - first, while nothing else has grown the process: the "base" model at BASE (~250 MB in fp32) loaded with
    load_sharded, the growth of each rank's peak RSS over the load, and whether the shards hold the file's
    values;
  - how the parameters are sharded, then one GRPO step (KL reference, 2 micro-batches per rank) on the fixed
    rollout of tests/test_trainer.py, each rank given its own prompt's rows, per loss aggregation mode in
    STEP_AGGS: gathered gradients, updated weights and metrics, and the time of the step and of a state gather;
  - a 2-step run with the HF sampler (synced decoding), checkpointing every step, its final model saved to
    OUT/final_model (save_pretrained_full); then a fresh model, trainer
    and optimizer restored from its step-1 checkpoint (weights broadcast from rank 0) run step 2 again;
  - the single-process checkpoint CKPT loaded into a sharded model and optimizer;
  - 5 steps at lr 1e-6 with bf16 compute (FSDP2 MixedPrecisionPolicy) over fp32 sharded masters, with a bf16
    reference, on the fixed rollout: the gathered weights;
  - a small GPT-2 sharded by its decoder blocks (transformer.h, found through _no_split_modules): its logits.

Rank 0 writes what it found to OUT/result.pt.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from grpo.distributed import (
    ShardingConfig,
    full_model_state,
    init_distributed,
    is_main,
    load_full_model_state,
    load_sharded,
    optimizer_state,
    rank,
    save_pretrained_full,
    setup_sharded,
    shard_model,
    world_size,
)
from grpo.generation import HFGenerator, Rollout
from grpo.trainer import GRPOConfig, GRPOTrainer
from tests import resume_worker
from tests.test_trainer import GROUP, PROMPTS, FixedGenerator, fixed_rollout
from tests.toy import digit_reward, toy_model, toy_prompts, toy_tokenizer

STEP_AGGS = ("token-mean", "seq-mean-token-mean")


def length_reward(metas, texts):
    """A varied reward that depends on the text only (not on its place in the batch, which differs per rank)."""
    return [float(len(t) % 5) for t in texts], [{} for _ in texts]


def step_config(loss_agg: str) -> GRPOConfig:
    """One step over PROMPTS x GROUP = 16 samples in micro-batches of 4, KL against a reference."""
    return GRPOConfig(
        total_steps=4,
        prompts_per_step=PROMPTS,
        group_size=GROUP,
        micro_batch_size=4,
        lr=1e-3,
        kl_coef=0.05,
        loss_agg=loss_agg,
        max_new_tokens=7,
        checkpoint_every=100,
    )


def rank_rows(rollout: Rollout, index: int, count: int) -> Rollout:
    """Rank `index`'s share (contiguous rows) of a rollout split over `count` ranks."""
    share = rollout.num_samples // count
    rows = slice(index * share, (index + 1) * share)
    fields = {
        f.name: getattr(rollout, f.name)[rows]
        for f in dataclasses.fields(rollout)
        if isinstance(getattr(rollout, f.name), torch.Tensor)
    }
    return dataclasses.replace(rollout, **fields)


def full_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


def one_step(out: Path) -> dict:
    tokenizer = toy_tokenizer()
    found: dict = {"world_size": world_size()}
    for agg in STEP_AGGS:
        model, ref_model = setup_sharded(toy_model(seed=0), toy_model(seed=1))
        if "shards" not in found:
            found["shards"] = {
                name: (type(p).__name__, tuple(p.shape), tuple(p.to_local().shape))
                for name, p in model.named_parameters()
            }
            found["ref_requires_grad"] = any(p.requires_grad for p in ref_model.parameters())
        rollout = rank_rows(fixed_rollout(len(tokenizer)), rank(), world_size())
        trainer = GRPOTrainer(
            model=model,
            tokenizer=tokenizer,
            generator=FixedGenerator(rollout),
            prompts=toy_prompts(4),
            reward_fn=length_reward,
            config=step_config(agg),
            run_dir=out / agg,
            ref_model=ref_model,
            console_log=False,
        )
        t = time.perf_counter()
        metrics = trainer.step()
        step_s = time.perf_counter() - t
        grads = full_grads(model)
        t = time.perf_counter()
        weights = full_model_state(model)
        found[agg] = {"metrics": metrics, "grads": grads, "weights": weights, "step_s": step_s}
        found[agg]["gather_s"] = time.perf_counter() - t
    return found


def toy_trainer(model, tokenizer, ref_model, run_dir: Path, steps: int) -> GRPOTrainer:
    """The toy GRPO run both sides compare: on each rank here, in one process in tests/test_fsdp.py."""
    return GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=HFGenerator(model, tokenizer),
        prompts=toy_prompts(5, tokenizer),
        reward_fn=digit_reward,
        config=resume_worker.config(steps),
        run_dir=run_dir,
        ref_model=ref_model,
        console_log=False,
    )


def sharded_trainer(model, run_dir: Path, steps: int) -> GRPOTrainer:
    model, ref_model = setup_sharded(model, toy_model(seed=0))
    return toy_trainer(model, toy_tokenizer(), ref_model, run_dir, steps)


def load_weights(model, checkpoint: Path) -> None:
    """Broadcast a checkpoint's weights from rank 0 (the only rank that reads the file) into a sharded model."""
    state = load_file(checkpoint / "model" / "model.safetensors") if is_main() else {}
    load_full_model_state(model, state)


def resume(out: Path, single_checkpoint: Path) -> dict:
    run_dir = out / "run"
    steps = 2
    trainer = sharded_trainer(toy_model(seed=0), run_dir, steps)
    history = trainer.train(progress=False)
    found: dict = {
        "uninterrupted": {
            "weights": full_model_state(trainer.model),
            "optimizer": optimizer_state(trainer.model, trainer.optimizer),
            "rewards": [m["reward_mean"] for m in history],
        }
    }
    save_pretrained_full(trainer.model, trainer.tokenizer, out / "final_model")
    # "Restart": new objects, other initial weights, then the step-1 checkpoint's weights and state.
    checkpoint = run_dir / "checkpoints" / "step-000001"
    resumed = sharded_trainer(toy_model(seed=7), run_dir, steps)
    load_weights(resumed.model, checkpoint)
    resumed.restore(checkpoint)
    history = resumed.train(progress=False)
    found["resumed"] = {
        "weights": full_model_state(resumed.model),
        "optimizer": optimizer_state(resumed.model, resumed.optimizer),
        "rewards": [m["reward_mean"] for m in history],
    }
    # A single-process checkpoint, loaded sharded.
    loader = sharded_trainer(toy_model(seed=7), out / "from-single", steps)
    load_weights(loader.model, single_checkpoint)
    loader.restore(single_checkpoint)
    found["from_single"] = {
        "weights": full_model_state(loader.model),
        "optimizer": optimizer_state(loader.model, loader.optimizer),
        "step": loader.step_count,
    }
    return found


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sharded_load(base: Path) -> dict:
    """Peak RSS growth of each rank while load_sharded reads `base`: the lifetime peak after the load minus the
    RSS before it. Run first, while the process's peak is its current RSS, the growth is exact; any earlier
    peak could only make it read higher."""
    before = rss_mb()
    model, _ = load_sharded(base, dtype="float32")
    growth = peak_rss_mb() - before
    growths = [None] * world_size()
    torch.distributed.all_gather_object(growths, growth)
    full = full_model_state(model)
    exact = None
    if is_main():
        saved = load_file(base / "model.safetensors")
        exact = all(name in full and torch.equal(full[name], value) for name, value in saved.items())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {"rss_growth_mb": growths, "exact": exact, "tied": tied, "sharded": type(model).__name__}


def mixed_precision_config() -> GRPOConfig:
    """The fixed rollout (16 samples, micro-batches of 4), 5 steps at the paper's lr 1e-6, KL 0.001."""
    return dataclasses.replace(step_config("token-mean"), total_steps=5, lr=1e-6, kl_coef=0.001)


def mixed_precision(out: Path) -> dict:
    """5 steps with bf16 compute over fp32 sharded masters (and a bf16 reference): the gathered weights."""
    bf16 = ShardingConfig(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, ref_model = setup_sharded(toy_model(seed=0), toy_model(seed=1).bfloat16(), bf16)
    tokenizer = toy_tokenizer()
    trainer = GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=FixedGenerator(rank_rows(fixed_rollout(len(tokenizer)), rank(), world_size())),
        prompts=toy_prompts(4),
        reward_fn=length_reward,
        config=mixed_precision_config(),
        run_dir=out / "mixed-precision",
        ref_model=ref_model,
        console_log=False,
        compute_dtype=torch.bfloat16,
    )
    for _ in range(trainer.config.total_steps):
        trainer.step()
    dtypes = {str(p.dtype) for p in model.parameters()}
    return {"weights": full_model_state(model), "master_dtypes": dtypes}


def small_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


def sharded_gpt2() -> dict:
    """A GPT-2 (decoder blocks under transformer.h) sharded by shard_model: its logits on fixed tokens."""
    model = shard_model(small_gpt2())
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    block_units = sum(type(m).__name__ == "FSDPGPT2Block" for m in model.modules())
    return {"logits": logits, "block_units": block_units}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("base", type=Path)
    args = parser.parse_args()
    init_distributed()
    found = {"sharded_load": sharded_load(args.base)}  # first: see sharded_load
    found |= {**one_step(args.out), **resume(args.out, args.checkpoint)}
    found |= {"mixed_precision": mixed_precision(args.out), "gpt2": sharded_gpt2()}
    if is_main():
        torch.save(found, args.out / "result.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""GRPO step time with the policy FSDP2-sharded over torchrun processes against one process, and the time to
gather the full model + optimizer state to rank 0 (what every checkpoint and a generator weight sync cost).

    python -m benchmarks.fsdp_step [--steps N] [--out FILE.json]                               # one process
    torchrun --nproc-per-node 2 -m benchmarks.fsdp_step [--steps N] [--out FILE.json]          # 2 ranks, gloo

Same task either way (benchmarks.common: the 'tiny' Qwen2, A.4 prompts, digit-share reward, HF sampler, a KL
reference model), so the batch per step is the same and only its split over ranks differs. The first step is
warmup and not counted. Rank 0 prints and writes the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from benchmarks.common import bench_task, summarize, write_result
from grpo.distributed import (
    full_model_state,
    init_distributed,
    is_main,
    optimizer_state,
    setup_sharded,
    world_size,
)
from grpo.generation import HFGenerator
from grpo.trainer import GRPOConfig


def run(steps: int, run_dir: Path) -> dict:
    task = bench_task("tiny")
    model, ref_model = task.model(), task.model()
    if world_size() > 1:
        setup_sharded(model, ref_model)
    config = GRPOConfig(
        total_steps=steps + 1,
        prompts_per_step=4,
        group_size=4,
        micro_batch_size=8,
        lr=1e-4,
        kl_coef=0.001,
        max_new_tokens=32,
        checkpoint_every=1000,
    )
    trainer = task.trainer(model, HFGenerator(model, task.tokenizer), config, run_dir, ref_model)
    history = [trainer.step() for _ in range(steps + 1)][1:]
    gathers = []
    for _ in range(3):
        t = time.perf_counter()
        full_model_state(trainer.model)
        optimizer_state(trainer.model, trainer.optimizer)
        gathers.append(time.perf_counter() - t)
    t = time.perf_counter()
    trainer.save()
    save_s = time.perf_counter() - t
    split = ("generate", "reward", "logprob", "update", "sync")
    return {
        "world_size": world_size(),
        "threads_per_process": torch.get_num_threads(),
        "samples_per_step": config.prompts_per_step * config.group_size,
        "max_new_tokens": config.max_new_tokens,
        "step_s": summarize([m["time_step"] for m in history]),
        **{f"{k}_s": summarize([m[f"time_{k}"] for m in history]) for k in split},
        "gather_model_and_optimizer_s": summarize(gathers),
        "checkpoint_save_s": save_s,
        "task": task.describe(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    init_distributed()
    with TemporaryDirectory() as run_dir:
        result = run(args.steps, Path(run_dir))
    if is_main():
        print(json.dumps(result, indent=2))
        write_result(result, args.out)


if __name__ == "__main__":
    main()

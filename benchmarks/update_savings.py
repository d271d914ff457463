"""What two savings in our GRPO update give, each measured against the work it avoids, side by side.

- The entropy graph: with ``entropy_coef == 0`` the update logs the entropy but computes it without an
  autograd graph (``response_logprobs(entropy_grad=False)``). Here every round times the update phase both
  ways on the same rollout: as it runs, and with the graph built as it was before (``entropy_grad=True``,
  though the loss never uses it).
- The old-log-prob pass: one epoch over one mini-batch is on-policy, so the update takes the old log-probs
  from its own forward pass. What that skips is one more no-grad pass over the rollout with the policy, timed
  here beside the reference model's pass (the same work, which the step still does).

The task is the step benchmark's (tiny Qwen2, A.4 prompts, 4 prompts x 8 samples, 128 new tokens, EOS
suppressed so every response has 128 tokens). Rounds alternate the order of the two update variants; each
round restores the weights and optimizer state so both update the same model.

    python -m benchmarks.update_savings [--quick] [--out FILE.json]
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import grpo.trainer as trainer_module
from benchmarks.common import bench_task, simple_main, spread, summarize
from grpo.generation import HFGenerator, SamplingConfig
from grpo.policy import batched_response_logprobs
from grpo.trainer import GRPOConfig


@dataclass(frozen=True)
class SavingsBenchConfig:
    size: str = "tiny"
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 128
    rounds: int = 6
    compute_dtype: str = "float32"
    seed: int = 0


QUICK = SavingsBenchConfig(prompts_per_step=1, group_size=4, max_new_tokens=8, rounds=2)


def with_entropy_graph(function):
    """``response_logprobs`` as the update called it before: the entropy's graph built whatever the loss."""

    def call(*args, **kwargs):
        return function(*args, **{**kwargs, "entropy_grad": True})

    return call


def run(cfg: SavingsBenchConfig | None = None) -> dict:
    cfg = cfg or SavingsBenchConfig()
    dtype = getattr(torch, cfg.compute_dtype)
    task = bench_task(cfg.size, seed=cfg.seed)
    model = task.model()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    config = GRPOConfig(
        total_steps=10**6,
        prompts_per_step=cfg.prompts_per_step,
        group_size=cfg.group_size,
        micro_batch_size=cfg.prompts_per_step * cfg.group_size,
        lr=1e-5,
        kl_coef=0.001,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        generator = HFGenerator(model, task.tokenizer, compute_dtype=dtype)
        trainer = task.trainer(model, generator, config, Path(tmp), reference, dtype)
        prompts = [p.text for p in task.prompts[: cfg.prompts_per_step]]
        sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens, seed=1
        )
        rollout = generator.generate(prompts, cfg.group_size, sampling)
        advantages = torch.randn(rollout.num_samples)
        start_state = copy.deepcopy(model.state_dict())
        plain = trainer_module.response_logprobs
        times: dict[str, list[float]] = {"update": [], "update_with_entropy_graph": []}
        passes: dict[str, list[float]] = {"policy_pass": [], "reference_pass": []}
        for index in range(cfg.rounds):
            order = list(times) if index % 2 == 0 else list(reversed(times))
            for variant in order:
                model.load_state_dict(start_state)
                trainer.optimizer.state.clear()
                trainer_module.response_logprobs = plain if variant == "update" else with_entropy_graph(plain)
                try:
                    _, ref_logprobs = trainer._logprobs(rollout)
                    begin = time.perf_counter()
                    trainer._update(rollout, advantages, None, ref_logprobs)
                    times[variant].append(time.perf_counter() - begin)
                finally:
                    trainer_module.response_logprobs = plain
            for name, net in (("policy_pass", model), ("reference_pass", reference)):
                begin = time.perf_counter()
                with trainer.compute():
                    batched_response_logprobs(net, rollout, micro_batch_size=config.micro_batch_size)
                passes[name].append(time.perf_counter() - begin)
    ratios = [a / b for a, b in zip(times["update"], times["update_with_entropy_graph"], strict=True)]
    return {
        "config": asdict(cfg),
        "samples": rollout.num_samples,
        "response_tokens": int(rollout.response_mask.sum()),
        "seconds": {name: summarize(values) for name, values in {**times, **passes}.items()},
        "update_over_update_with_entropy_graph": spread(ratios),
    }


def print_result(result: dict) -> None:
    for name, values in result["seconds"].items():
        print(f"{name:28s} median {values['median']:.3f} s  [{values['min']:.3f}, {values['max']:.3f}]")
    ratio = result["update_over_update_with_entropy_graph"]
    print(
        f"update without / with the entropy graph: {ratio['median']:.3f} [{ratio['min']:.3f}, "
        f"{ratio['max']:.3f}] {ratio['verdict']}"
    )


def main(argv: list[str] | None = None) -> dict:
    return simple_main(__doc__, run, SavingsBenchConfig(), QUICK, print_result, argv)


if __name__ == "__main__":
    main()

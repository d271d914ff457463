"""The sharded side of tests/test_vllm_generator.py's sharded-trainer test: vLLM beside a 2-rank FSDP2 trainer.

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT -m tests.vllm_sharded_worker OUT

Each rank asks for greedy continuations of its own two prompts, through the one engine on rank 0
(grpo.sharded_rollouts, built by build_generator as a sharded run builds it); then one GRPO step whose rollouts
come from that engine updates the sharded policy and syncs the engine; then the greedy continuations again.
Rank 0 writes to OUT/result.pt what every rank got, and the greedy continuations of the gathered updated
weights in a plain model (the trainer's own greedy output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grpo.distributed import full_model_state, gather_objects, init_distributed, is_main, rank, setup_sharded
from grpo.generation import GeneratorConfig, SamplingConfig, build_generator
from grpo.trainer import GRPOConfig, GRPOTrainer
from tests.test_generation import manual_greedy
from tests.toy import digit_reward, toy_model, toy_prompts, toy_tokenizer

GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    init_distributed()
    tokenizer = toy_tokenizer()
    model, _ = setup_sharded(toy_model(seed=0))
    config = GeneratorConfig(kind="vllm", dtype="float32", bucket_mb=1.0)
    generator = build_generator(config, model, tokenizer, out / "engine")
    prompts = toy_prompts(4)
    mine = [p.text for p in prompts[2 * rank() : 2 * rank() + 2]]

    def greedy() -> tuple[list[list[int]], list[list[int]]]:
        """(response tokens, prompt tokens) of this rank's rows."""
        rollout = generator.generate(mine, 1, GREEDY)
        responses = [
            ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, rollout.response_mask, strict=True)
        ]
        prompt_ids = [
            ids[m.bool()].tolist() for ids, m in zip(rollout.prompt_ids, rollout.prompt_mask, strict=True)
        ]
        return responses, prompt_ids

    before, _ = greedy()
    trainer = GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=generator,
        prompts=prompts,
        reward_fn=digit_reward,
        config=GRPOConfig(
            total_steps=1,
            prompts_per_step=2,
            group_size=4,
            micro_batch_size=4,
            lr=1e-3,  # one step that visibly moves the greedy output
            kl_coef=0.0,
            max_new_tokens=8,
            checkpoint_every=100,
        ),
        run_dir=out / "run",
        console_log=False,
    )
    metrics = trainer.step()
    after, prompt_ids = greedy()
    weights = full_model_state(model)
    found = gather_objects([{"prompts": mine, "before": before, "after": after, "prompt_ids": prompt_ids}])
    if is_main():
        plain = toy_model(seed=0)
        plain.load_state_dict(weights)
        expected = [
            manual_greedy(plain.eval(), tokenizer, p, GREEDY.max_new_tokens)
            for f in found
            for p in f["prompts"]
        ]
        encoded = [tokenizer.encode(p, add_special_tokens=False) for f in found for p in f["prompts"]]
        torch.save(
            {
                "ranks": found,
                "expected": expected,
                "encoded": encoded,
                "metrics": metrics,
                "engine_version": generator.engine.weight_version,
            },
            out / "result.pt",
        )
    generator.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

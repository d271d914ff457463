"""A short GRPO run on the toy task, for the kill-and-resume test (tests/test_checkpoint.py), which runs it in its
own process (to SIGKILL it) or calls `run` directly.

    python -m tests.resume_worker RUN_DIR STEPS [--resume] [--stall-at STEP]

Checkpoints every step. --resume continues from the newest checkpoint in RUN_DIR (model weights from its model/
directory, then optimizer, scheduler, RNG and data position via trainer.restore). --stall-at STEP hangs once STEP
is logged but before its checkpoint is written, so the test's SIGKILL lands where the log is ahead of the
checkpoints. The settings exercise every piece of state a resume must bring back: a warmup + cosine schedule,
two optimizer updates per step (old log-probs from a separate pass), a KL reference model and the prompt order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from grpo.checkpoint import latest_checkpoint
from grpo.generation import HFGenerator
from grpo.models import load_model_and_tokenizer
from grpo.trainer import GRPOConfig, GRPOTrainer
from tests.toy import digit_reward, toy_model, toy_prompts, toy_tokenizer


def config(total_steps: int) -> GRPOConfig:
    return GRPOConfig(
        total_steps=total_steps,
        prompts_per_step=2,
        group_size=4,
        mini_batch_size=4,
        micro_batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        lr_schedule="cosine",
        kl_coef=0.01,
        max_new_tokens=6,
        seed=3,
        checkpoint_every=1,
        keep_last=2,
    )


def run(run_dir: Path, steps: int, *, resume: bool = False, stall_at: int = 0) -> None:
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        tokenizer = toy_tokenizer()
        model = toy_model(seed=0)
    else:
        model, tokenizer = load_model_and_tokenizer(checkpoint / "model", dtype="float32")
    trainer = GRPOTrainer(
        model=model,
        tokenizer=tokenizer,
        generator=HFGenerator(model, tokenizer),
        prompts=toy_prompts(5, tokenizer),
        reward_fn=digit_reward,
        config=config(steps),
        run_dir=run_dir,
        ref_model=toy_model(seed=0),  # the frozen initial model, rebuilt identically on every start
        console_log=False,
    )
    if checkpoint is not None:
        trainer.restore(checkpoint)
    if stall_at:
        save = trainer.save

        def stalling_save():
            if trainer.step_count == stall_at:
                time.sleep(600)  # killed here by the test
            return save()

        trainer.save = stalling_save
    trainer.train(progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stall-at", type=int, default=0)
    args = parser.parse_args()
    run(args.run_dir, args.steps, resume=args.resume, stall_at=args.stall_at)


if __name__ == "__main__":
    main()

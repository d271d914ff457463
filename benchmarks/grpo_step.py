"""One GRPO step in our GRPOTrainer and in TRL's GRPOTrainer, side by side in one process.

Both trainers get the same model (the same safetensors file, float32), tokenizer, A.4 prompts, group size,
samples per step, response length, reward function, optimizer (AdamW, constant lr, no weight decay, gradient
clipping at 1.0) and loss settings:

    ours                                   TRL (GRPOConfig)
    loss_agg="token-mean"                  loss_type="bnpo" (token mean over the step's batch; with one process
                                           and no gradient accumulation "dapo" is the same number)
    clip_low = clip_high = eps             epsilon = eps (epsilon_high defaults to it)
    kl_coef, kl_kind="k3"                  beta (TRL's KL is k3)
    advantage_scale="group"                scale_rewards="group"
    one mini-batch, one micro-batch        per_device_train_batch_size = samples per step,
                                           gradient_accumulation_steps = 1, num_iterations = 1
    temperature 1, top_p 1, no top-k       temperature 1, top_p 1, top_k 0

Known differences that remain: TRL's group std is Bessel-corrected with eps 1e-4, ours is the population std
(paper eq. 2) with eps 1e-6; ours clamps the per-token k3 KL to [-10, 10]; the sampled responses differ
(different RNG streams) so the token counts differ slightly.

The steps alternate (TRL, ours, TRL, ours, ...) through a TrainerCallback, so both see the same machine load.
The first ``warmup`` steps of each are not counted. Our step's own timers split it into generate / reward /
logprob / update / sync; TRL's is split by timing its generation, reward and generate-and-score methods.

    python -m benchmarks.grpo_step [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (
    BenchTask,
    PeakRSS,
    bench_task,
    digit_share_reward,
    summarize,
    write_result,
)
from grpo.generation import HFGenerator
from grpo.models import save_model
from grpo.trainer import GRPOConfig, GRPOTrainer

PHASES = ("generate", "reward", "logprob", "update", "sync")


@dataclass
class StepBenchConfig:
    size: str = "tiny"
    prompts_per_step: int = 2
    group_size: int = 8
    max_new_tokens: int = 64
    lr: float = 1e-5
    kl_coef: float = 0.001  # the paper's (A.1); > 0 so both trainers run a reference model
    clip_eps: float = 0.2
    warmup: int = 1
    steps: int = 4
    seed: int = 0
    # Peak memory of each trainer alone, in a fresh process (in one process the heap the first trainer grew is
    # reused by the second, so per-side memory there is not comparable)
    isolated_memory: bool = True


QUICK = StepBenchConfig(
    prompts_per_step=1, group_size=4, max_new_tokens=8, warmup=1, steps=1, isolated_memory=False
)


def load_float32(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def our_trainer(task: BenchTask, model_dir: Path, run_dir: Path, cfg: StepBenchConfig) -> GRPOTrainer:
    model, ref = load_float32(model_dir), load_float32(model_dir).eval()
    ref.requires_grad_(False)
    samples = cfg.prompts_per_step * cfg.group_size
    config = GRPOConfig(
        total_steps=10**6,  # step() is driven from outside; nothing is checkpointed
        prompts_per_step=cfg.prompts_per_step,
        group_size=cfg.group_size,
        mini_batch_size=0,
        micro_batch_size=samples,
        lr=cfg.lr,
        weight_decay=0.0,
        max_grad_norm=1.0,
        clip_low=cfg.clip_eps,
        clip_high=cfg.clip_eps,
        kl_coef=cfg.kl_coef,
        kl_kind="k3",
        loss_agg="token-mean",
        advantage_scale="group",
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    return GRPOTrainer(
        model=model,
        tokenizer=task.tokenizer,
        generator=HFGenerator(model, task.tokenizer, batch_size=samples),
        prompts=task.prompts,
        reward_fn=digit_share_reward,
        config=config,
        run_dir=run_dir,
        ref_model=ref,
        console_log=False,
    )


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward signature around the same reward function."""
    return digit_share_reward([{}] * len(completions), completions)[0]


def trl_trainer(task: BenchTask, model_dir: Path, out_dir: Path, cfg: StepBenchConfig, callback):
    """TRL's GRPOTrainer on the same model file, with timers around generation, reward and scoring."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    class TimedTRLTrainer(TRLTrainer):
        """Adds up the seconds spent in generation, reward and the whole generate-and-score phase (which also
        holds the reference log-probs), and the prompt + completion tokens of each step."""

        bench = Counter()

        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            self.bench["generate"] += time.perf_counter() - start
            return out

        def _calculate_rewards(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            self.bench["reward"] += time.perf_counter() - start
            return out

        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.bench["rollout"] += time.perf_counter() - start
            self.bench["generations"] += 1
            self.bench["samples"] += int(out["completion_ids"].shape[0])
            self.bench["tokens"] += int(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

    samples = cfg.prompts_per_step * cfg.group_size
    args = TRLConfig(
        output_dir=str(out_dir),
        max_steps=cfg.warmup + cfg.steps,
        per_device_train_batch_size=samples,
        gradient_accumulation_steps=1,
        num_generations=cfg.group_size,
        num_iterations=1,
        max_completion_length=cfg.max_new_tokens,
        learning_rate=cfg.lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        beta=cfg.kl_coef,
        epsilon=cfg.clip_eps,
        loss_type="bnpo",
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"prompt": [p.text for p in task.prompts]})
    return TimedTRLTrainer(
        model=str(model_dir),
        reward_funcs=trl_reward,
        args=args,
        train_dataset=dataset,
        processing_class=task.tokenizer,
        callbacks=[callback] if callback else None,
    )


def count_optimizer_steps(optimizer: torch.optim.Optimizer, counter: Counter, key: str) -> None:
    optimizer.register_step_post_hook(lambda *_: counter.update([key]))


def changed_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Largest absolute change of any weight since ``reference`` (0 means no update happened)."""
    return max((p.detach().cpu() - reference[n]).abs().max().item() for n, p in model.named_parameters())


def our_step(trainer: GRPOTrainer) -> dict:
    with PeakRSS() as rss:
        metrics = trainer.step()
    tokens = metrics["tokens_per_s"] * metrics["time_step"]
    return {
        "step_s": metrics["time_step"],
        **{f"{k}_s": metrics[f"time_{k}"] for k in PHASES},
        "tokens": tokens,
        "tokens_per_s": metrics["tokens_per_s"],
        "peak_rss_mb": rss.peak / 2**20,
        "rss_growth_mb": rss.growth / 2**20,
        "response_length": metrics["response_length"],
    }


def side_summary(steps: list[dict]) -> dict:
    keys = [k for k in steps[0] if isinstance(steps[0][k], float | int)]
    return {k: summarize([s[k] for s in steps]) for k in keys}


def run(cfg: StepBenchConfig | None = None) -> dict:
    cfg = cfg or StepBenchConfig()
    task = bench_task(cfg.size, seed=cfg.seed)
    have_trl = (
        importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    )
    counts: Counter = Counter()
    ours_steps: list[dict] = []
    trl_steps: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model(task.model(), task.tokenizer, tmp / "model")
        initial = {n: p.detach().clone() for n, p in load_float32(model_dir).named_parameters()}
        ours = our_trainer(task, model_dir, tmp / "ours", cfg)
        count_optimizer_steps(ours.optimizer, counts, "ours_optimizer_steps")
        described = task.describe(ours.model)

        def ours_once() -> None:
            ours_steps.append(our_step(ours))
            counts["ours_generations"] += 1

        if have_trl:
            from transformers import TrainerCallback

            class Alternate(TrainerCallback):
                """Times each TRL optimizer step (generation, loss, backward, optimizer) and runs one of ours
                right after it."""

                rss: PeakRSS | None = None
                start = 0.0

                def on_step_begin(self, args, state, control, **kwargs):
                    if not counts["trl_hooked"]:
                        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
                        count_optimizer_steps(optimizer, counts, "trl_optimizer_steps")
                        counts["trl_hooked"] = 1
                    trainer.bench.clear()
                    self.rss = PeakRSS().__enter__()
                    self.start = time.perf_counter()

                def on_step_end(self, args, state, control, **kwargs):
                    step_s = time.perf_counter() - self.start
                    self.rss.__exit__(None, None, None)
                    b = trainer.bench
                    trl_steps.append(
                        {
                            "step_s": step_s,
                            "generate_s": b["generate"],
                            "reward_s": b["reward"],
                            # generate-and-score minus generation and reward: tokenising, reference log-probs
                            "logprob_s": b["rollout"] - b["generate"] - b["reward"],
                            "update_s": step_s - b["rollout"],
                            "tokens": b["tokens"],
                            "tokens_per_s": b["tokens"] / step_s,
                            "peak_rss_mb": self.rss.peak / 2**20,
                            "rss_growth_mb": self.rss.growth / 2**20,
                            "generations": b["generations"],
                            "samples": b["samples"],
                        }
                    )
                    ours_once()

            trainer = trl_trainer(task, model_dir, tmp / "trl", cfg, Alternate())
            trainer.train()
            trl_changed = changed_weights(trainer.model, initial)
        else:
            for _ in range(cfg.warmup + cfg.steps):
                ours_once()
        ours_changed = changed_weights(ours.model, initial)

    total = cfg.warmup + cfg.steps
    result: dict = {
        "config": asdict(cfg),
        "task": {**described, "samples_per_step": cfg.prompts_per_step * cfg.group_size},
        "ours": side_summary(ours_steps[cfg.warmup :]),
    }
    check = {
        "ours": {
            "optimizer_steps_per_grpo_step": counts["ours_optimizer_steps"] / total,
            "generations_per_grpo_step": counts["ours_generations"] / total,
            "loss": f"token-mean PPO-clip eps={cfg.clip_eps} + {cfg.kl_coef} * k3 KL",
            "max_weight_change": ours_changed,
        }
    }
    if have_trl:
        result["trl"] = side_summary(trl_steps[cfg.warmup :])
        check["trl"] = {
            "optimizer_steps_per_grpo_step": counts["trl_optimizer_steps"] / len(trl_steps),
            "generations_per_grpo_step": sum(s["generations"] for s in trl_steps) / len(trl_steps),
            "samples_per_generation": trl_steps[-1]["samples"] / max(1, trl_steps[-1]["generations"]),
            "loss": f"loss_type=bnpo epsilon={trainer.epsilon_low} beta={trainer.beta} (k3)",
            "max_weight_change": trl_changed,
        }
        same = all(
            check["ours"][k] == check["trl"][k]
            for k in ("optimizer_steps_per_grpo_step", "generations_per_grpo_step")
        )
        same = same and check["trl"]["samples_per_generation"] == cfg.prompts_per_step * cfg.group_size
        check["same_update"] = bool(same and ours_changed > 0 and trl_changed > 0)
        ours_s, trl_s = result["ours"], result["trl"]
        result["ratio_ours_over_trl"] = {
            "step_time": ours_s["step_s"]["median"] / trl_s["step_s"]["median"],
            "tokens_per_s": ours_s["tokens_per_s"]["median"] / trl_s["tokens_per_s"]["median"],
        }
        result["note"] = "target: our step faster than TRL's (step_time ratio < 1)"
    else:
        result["note"] = "trl not installed (pip install 'crystal-grpo[bench]'): TRL side skipped"
    result["update_check"] = check
    if cfg.isolated_memory:
        result["alone"] = {
            side: run_alone(side, cfg) for side in (("ours", "trl") if have_trl else ("ours",))
        }
        if have_trl:
            result["ratio_ours_over_trl"]["peak_rss_alone"] = (
                result["alone"]["ours"]["peak_rss_mb"] / result["alone"]["trl"]["peak_rss_mb"]
            )
    return result


def print_result(result: dict) -> None:
    sides = [s for s in ("ours", "trl") if s in result]
    print(f"{'':14s}" + "".join(f"{s:>12s}" for s in sides))
    for key in ("step_s", *(f"{p}_s" for p in PHASES), "tokens_per_s", "peak_rss_mb", "rss_growth_mb"):
        cells = [result[s][key]["median"] if key in result[s] else None for s in sides]
        print(f"{key:14s}" + "".join(f"{'-':>12s}" if c is None else f"{c:12.3f}" for c in cells))
    for key, value in result.get("ratio_ours_over_trl", {}).items():
        print(f"ratio ours/TRL {key}: {value:.3f}")
    for side, memory in result.get("alone", {}).items():
        print(
            f"{side} alone: RSS {memory['rss_built_mb']:.0f} MB once built, peak {memory['peak_rss_mb']:.0f} MB"
        )
    print("update check:", json.dumps(result["update_check"], indent=1))
    print("note:", result["note"])


def alone(side: str, cfg: StepBenchConfig) -> dict:
    """Run one trainer alone for warm-up + steps GRPO steps: RSS once it is built, and the peak RSS while it
    trains (sampled; the kernel's ru_maxrss would also count the set-up: tokenizer training, data loading)."""
    task = bench_task(cfg.size, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model(task.model(), task.tokenizer, tmp / "model")
        if side == "ours":
            trainer = our_trainer(task, model_dir, tmp / "ours", cfg)
            with PeakRSS() as rss:
                for _ in range(cfg.warmup + cfg.steps):
                    trainer.step()
        else:
            trainer = trl_trainer(task, model_dir, tmp / "trl", cfg, callback=None)
            with PeakRSS() as rss:
                trainer.train()
    return {"rss_built_mb": rss.start / 2**20, "peak_rss_mb": rss.peak / 2**20}


def run_alone(side: str, cfg: StepBenchConfig) -> dict:
    """``alone`` in a fresh Python process (its result is the last line it prints)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.grpo_step",
        "--alone",
        side,
        "--config",
        json.dumps(asdict(cfg)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration the smoke test runs")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument(
        "--alone", choices=("ours", "trl"), help="internal: one trainer alone, memory as JSON"
    )
    parser.add_argument("--config", help="internal: the StepBenchConfig for --alone, as JSON")
    args = parser.parse_args(argv)
    if args.alone:
        result = alone(args.alone, StepBenchConfig(**json.loads(args.config)))
        print(json.dumps(result))
        return result
    result = run(QUICK if args.quick else StepBenchConfig())
    print_result(result)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()


def markdown(result: dict) -> str:
    cfg, task = result["config"], result["task"]
    lines = [
        "### GRPO step: ours vs TRL",
        "",
        f"{task['model']}, {task['parameters'] / 1e6:.1f}M parameters, A.4 prompts of "
        f"{task['prompt_tokens_mean']:.0f} tokens; {cfg['prompts_per_step']} prompts x {cfg['group_size']} "
        f"samples, up to {cfg['max_new_tokens']} new tokens, AdamW lr {cfg['lr']}, clip {cfg['clip_eps']}, "
        f"k3 KL {cfg['kl_coef']} (reference model on both sides); median of {cfg['steps']} alternating steps "
        f"after {cfg['warmup']} warm-up.",
        "",
        "| per step | ours | TRL | ours / TRL |",
        "| --- | --- | --- | --- |",
    ]
    rows = [(f"{p} s", f"{p}_s") for p in PHASES] + [
        ("**total s**", "step_s"),
        ("tokens/s (prompt + response)", "tokens_per_s"),
    ]
    trl = result.get("trl", {})
    for label, key in rows:
        ours = result["ours"][key]["median"]
        theirs = trl.get(key, {}).get("median") if key in trl else None
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        lines.append(f"| {label} | {ours:.3g} | {'-' if theirs is None else f'{theirs:.3g}'} | {ratio} |")
    alone = result.get("alone", {})
    if alone:
        cells = [alone.get(side) for side in ("ours", "trl")]
        for label, key in (
            ("RSS once built, alone MB", "rss_built_mb"),
            ("**peak RSS while training, alone MB**", "peak_rss_mb"),
        ):
            ours, theirs = (None if c is None else c[key] for c in cells)
            ratio = f"{ours / theirs:.2f}" if theirs else "-"
            lines.append(f"| {label} | {ours:.0f} | {'-' if theirs is None else f'{theirs:.0f}'} | {ratio} |")
    check = result["update_check"]
    if "trl" in check:
        verdict = "met" if result["ratio_ours_over_trl"]["step_time"] < 1 else "**missed**"
        lines += [
            "",
            f"Same update on both sides: {check['same_update']} (optimizer steps per GRPO step "
            f"{check['ours']['optimizer_steps_per_grpo_step']:g} vs {check['trl']['optimizer_steps_per_grpo_step']:g}, "
            f"generations per step {check['ours']['generations_per_grpo_step']:g} vs "
            f"{check['trl']['generations_per_grpo_step']:g}; ours {check['ours']['loss']}, TRL {check['trl']['loss']}). "
            f"Target (our step faster than TRL's): {verdict}.",
        ]
    else:
        lines += ["", result["note"]]
    return "\n".join(lines)

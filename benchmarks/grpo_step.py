"""GRPO steps of our GRPOTrainer and TRL's GRPOTrainer, each with its generators, side by side in one process.

Sides (``StepBenchConfig.sides``):

    ours-hf     GRPOTrainer + HFGenerator (transformers generate on the policy)
    ours-vllm   GRPOTrainer + VLLMGenerator (a vLLM engine in the process, synced after every update)
    trl-hf      TRL GRPOTrainer, transformers generate
    trl-vllm    TRL GRPOTrainer, use_vllm=True, vllm_mode="colocate"; tried alone in a fresh process first
                (a second vLLM engine in one process can fail inside vLLM): if it cannot run a step here, the
                reason is recorded as the row's entry in ``missing``

Every side gets the same model (the same safetensors file, float32 weights), tokenizer, A.4 prompts, group size,
samples per step, response length, reward, optimizer (AdamW, constant lr, no weight decay, clipping at 1.0) and
loss:

    ours                                   TRL (GRPOConfig)
    loss_agg="token-mean"                  loss_type="bnpo" (token mean over the step's batch; with one process
                                           and no gradient accumulation "dapo" is the same number)
    clip_low = clip_high = eps             epsilon = eps (epsilon_high defaults to it)
    kl_coef, kl_kind="k3"                  beta (TRL's KL is k3)
    advantage_scale="group"                scale_rewards="group"
    one mini-batch, one micro-batch        per_device_train_batch_size = samples per step,
                                           gradient_accumulation_steps = 1, num_iterations = 1
    temperature 1, top_p 1, no top-k       temperature 1, top_p 1, top_k 0
    min_new_tokens (fixed length)          generation_kwargs={"min_new_tokens": ...}
    compute_dtype=bfloat16 (bf16)          bf16=True (both: autocast, float32 master weights; ours around
                                           each whole pass and the whole HF generate call, TRL's accelerate
                                           around each forward call); our vLLM engine runs in bf16

Known differences that remain: TRL's group std is Bessel-corrected with eps 1e-4, ours is the population std
(paper eq. 2) with eps 1e-6; ours clamps the per-token k3 KL to [-10, 10]; the sampled responses differ
(different RNG streams), so the token counts differ: each side's generated tokens, EOS rate and cap rate are in
the table, and the "fixed" length variant suppresses EOS on every side (every response is max_new_tokens long).

Variants (``variants``): "{sampled|fixed}-{float32|bfloat16|best}", each in its own process; "best" runs
each side in the dtype of its fastest median step among the variants of that length before it, so each
trainer is at its best on this machine. In a variant, every
round runs one step of each side, in an order that rotates from round to round (so no side always runs right
after another, or first after a pause); TRL's steps come from its own train() loop, ours run from its step
callbacks. After ``warmup`` untimed rounds come ``repeats`` repeats of ``steps`` rounds. A pairing's ratio
(ours / TRL) is taken per repeat; its spread over the repeats is reported, and a spread that crosses 1 is a tie.
Beside each step's wall time, its CPU time (time.process_time: every thread of this process, the colocated
vLLM engine included), a second view of the same pairing; on this machine it tracks the wall time (threads
that wait for a core spin), so it is no cure for a noisy neighbour: the alternation and the repeats are.

Anchors: the update phase's achieved FLOP/s, counted as 6 x parameters x tokens (real prompt + response tokens,
forward and backward), as a share of this machine's GEMM rate in the side's dtype, measured in the same
process (``common.gemm_rate``) at the start and end of the variant (the higher).

    python -m benchmarks.grpo_step [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (
    BenchTask,
    PeakRSS,
    bench_task,
    child_json,
    digit_share_reward,
    gemm_rate,
    spread,
    summarize,
    vllm_unavailable,
    write_result,
)
from grpo.generation import GeneratorConfig, HFGenerator
from grpo.models import save_model
from grpo.trainer import GRPOConfig, GRPOTrainer

PHASES = ("generate", "reward", "logprob", "update", "sync")
SIDES = ("ours-hf", "ours-vllm", "trl-hf", "trl-vllm")
LENGTHS = ("sampled", "fixed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FLOPS_FORMULA = "6 x parameters x (prompt + response tokens)"


@dataclass
class StepBenchConfig:
    size: str = "tiny"
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 128
    lr: float = 1e-5
    kl_coef: float = 0.001  # the paper's (A.1); > 0 so every side runs a reference model
    clip_eps: float = 0.2
    # fixed-best last: each side in its faster dtype of the fixed-length variants before it
    variants: tuple[str, ...] = ("sampled-float32", "fixed-float32", "fixed-bfloat16", "fixed-best")
    sides: tuple[str, ...] = SIDES
    warmup: int = 1  # untimed rounds before the first repeat
    repeats: int = 3
    steps: int = 2  # rounds per repeat
    seed: int = 0
    # Peak memory of ours-hf and trl-hf alone, each in a fresh process, one step of the first variant (in one
    # process the heap the first trainer grew is reused by the next, so per-side memory there is not comparable)
    isolated_memory: bool = True
    child_timeout_s: float = 7200.0
    target_ratio: float = 0.67  # issue 18: ours (best generator) / TRL (best mode) step time, 1.5x faster


QUICK = StepBenchConfig(
    prompts_per_step=1,
    group_size=4,
    max_new_tokens=8,
    # float32: a CPU without native bf16 (this AMD EPYC VM) multiplies bf16 ~70x slower (1.3 vs 90 GFLOP/s)
    variants=("fixed-float32", "fixed-best"),
    sides=("ours-hf", "ours-vllm", "trl-hf"),
    warmup=0,
    repeats=2,
    steps=1,
    isolated_memory=False,
)


def parse_variant(variant: str) -> tuple[str, str]:
    """(length, dtype) of "{length}-{dtype}"; dtype "best": each side in the dtype of its fastest step among the
    variants of that length run before it (see ``best_dtypes``)."""
    length, _, dtype = variant.partition("-")
    if length not in LENGTHS or dtype not in (*DTYPES, "best"):
        choices = "|".join((*DTYPES, "best"))
        raise ValueError(f"variant {variant!r}: expected {{{'|'.join(LENGTHS)}}}-{{{choices}}}")
    return length, dtype


def best_dtypes(variants: dict[str, dict], length: str, sides: list[str]) -> dict[str, str]:
    """Each side's dtype with the lowest median step time over the variants of ``length`` already summarised
    (float32 for a side none of them ran)."""
    out = {}
    for side in sides:
        times = {
            parse_variant(v)[1]: summary["sides"][side]["step_s"]["median"]
            for v, summary in variants.items()
            if parse_variant(v)[0] == length and side in summary["sides"]
        }
        out[side] = min(times, key=times.get) if times else "float32"
    return out


def have_trl() -> bool:
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def load_float32(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- the sides


def our_trainer(
    task: BenchTask,
    model_dir: Path,
    run_dir: Path,
    cfg: StepBenchConfig,
    length: str,
    dtype: str,
    generator_kind: str,
) -> GRPOTrainer:
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
        min_new_tokens=cfg.max_new_tokens if length == "fixed" else 0,
        seed=cfg.seed,
    )
    if generator_kind == "hf":
        generator = HFGenerator(model, task.tokenizer, batch_size=samples, compute_dtype=DTYPES[dtype])
    else:
        from grpo.vllm_generator import VLLMGenerator

        generator = VLLMGenerator(model_dir, task.tokenizer, GeneratorConfig(kind="vllm", dtype=dtype))
    return task.trainer(model, generator, config, run_dir, ref, DTYPES[dtype])


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's reward signature around the same reward function."""
    return digit_share_reward([{}] * len(completions), completions)[0]


def trl_trainer(
    task: BenchTask,
    model_dir: Path,
    out_dir: Path,
    cfg: StepBenchConfig,
    length: str,
    dtype: str,
    *,
    max_steps: int,
    use_vllm: bool = False,
    callback=None,
):
    """TRL's GRPOTrainer on the same model file, with timers around generation, reward and scoring."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    eos_ids = {task.tokenizer.eos_token_id}

    class TimedTRLTrainer(TRLTrainer):
        """Adds up the seconds spent in generation, reward and the whole generate-and-score phase (which also
        holds the reference log-probs), and counts each step's tokens and how its completions ended."""

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
            ids, mask = out["completion_ids"], out["completion_mask"].bool()
            ended = (torch.isin(ids, torch.tensor(sorted(eos_ids), device=ids.device)) & mask).any(dim=1)
            self.bench["generations"] += 1
            self.bench["samples"] += int(ids.shape[0])
            self.bench["eos"] += int(ended.sum())
            self.bench["response_tokens"] += int(mask.sum())
            self.bench["tokens"] += int(out["prompt_mask"].sum() + mask.sum())
            return out

    samples = cfg.prompts_per_step * cfg.group_size
    fixed = {"min_new_tokens" if not use_vllm else "min_tokens": cfg.max_new_tokens}
    vllm_args = (
        dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False, vllm_max_model_length=2048)
        if use_vllm
        else {}
    )
    args = TRLConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=samples,
        gradient_accumulation_steps=1,
        num_generations=cfg.group_size,
        num_iterations=1,
        max_completion_length=cfg.max_new_tokens,
        generation_kwargs=fixed if length == "fixed" else None,
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
        bf16=dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **vllm_args,
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
    cpu = time.process_time()
    with PeakRSS() as rss:
        metrics = trainer.step()
    cpu = time.process_time() - cpu
    samples = trainer.config.prompts_per_step * trainer.config.group_size
    return {
        "step_s": metrics["time_step"],
        "cpu_s": cpu,
        **{f"{k}_s": metrics[f"time_{k}"] for k in PHASES},
        "tokens": metrics["tokens_per_s"] * metrics["time_step"],
        "response_tokens": metrics["response_length"] * samples,
        "eos_rate": 1.0 - metrics["truncated_fraction"],
        "cap_rate": metrics["truncated_fraction"],
        "peak_rss_mb": rss.peak / 2**20,
    }


def trl_step(bench: Counter, step_s: float, cpu_s: float, rss: PeakRSS) -> dict:
    samples = max(1, bench["samples"])
    return {
        "step_s": step_s,
        "cpu_s": cpu_s,
        "generate_s": bench["generate"],
        "reward_s": bench["reward"],
        # generate-and-score minus generation and reward: tokenising, reference log-probs
        "logprob_s": bench["rollout"] - bench["generate"] - bench["reward"],
        "update_s": step_s - bench["rollout"],
        "sync_s": 0.0,  # TRL's HF path generates with the policy itself (its vLLM sync is inside generate)
        "tokens": float(bench["tokens"]),
        "response_tokens": float(bench["response_tokens"]),
        "eos_rate": bench["eos"] / samples,
        "cap_rate": 1.0 - bench["eos"] / samples,
        "peak_rss_mb": rss.peak / 2**20,
        "generations": bench["generations"],
        "samples": bench["samples"],
    }


def round_order(names: list[str], index: int) -> list[str]:
    """The sides' order in round ``index``: the list rotated by one place per round."""
    shift = index % len(names)
    return names[shift:] + names[:shift]


# ----------------------------------------------------------------------------------------------- one variant


def run_variant(cfg: StepBenchConfig, variant: str, dtypes: dict[str, str]) -> dict:
    """All sides of one variant (except trl-vllm), alternating, each side computing in ``dtypes[side]``: each
    side's steps and checks, and the GEMM rate of each dtype in use."""
    length, _ = parse_variant(variant)
    used = sorted(set(dtypes.values()))
    gemm = {name: [gemm_rate(DTYPES[name])] for name in used}
    task = bench_task(cfg.size, seed=cfg.seed)
    rounds = cfg.warmup + cfg.repeats * cfg.steps
    counts: Counter = Counter()
    steps: dict[str, list[dict]] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model(task.model(), task.tokenizer, tmp / "model")
        initial = {n: p.detach().clone() for n, p in load_float32(model_dir).named_parameters()}
        ours: dict[str, GRPOTrainer] = {}
        for side in ("ours-hf", "ours-vllm"):
            if side not in cfg.sides:
                continue
            if side == "ours-vllm" and (reason := vllm_unavailable()):
                missing[side] = reason
                continue
            kind = side.removeprefix("ours-")
            ours[side] = our_trainer(task, model_dir, tmp / side, cfg, length, dtypes[side], kind)
            count_optimizer_steps(ours[side].optimizer, counts, side)
            steps[side] = []
        described = task.describe(next(iter(ours.values())).model) if ours else {}
        names = list(ours) + (["trl-hf"] if "trl-hf" in cfg.sides and have_trl() else [])
        if "trl-hf" in cfg.sides and not have_trl():
            missing["trl-hf"] = "trl not installed (pip install 'crystal-grpo[bench]')"

        def run_ours(order: list[str]) -> None:
            for side in order:
                steps[side].append(our_step(ours[side]))

        if "trl-hf" in names:
            from transformers import TrainerCallback

            steps["trl-hf"] = []

            class Alternate(TrainerCallback):
                """Runs the round's sides before TRL in on_step_begin, times TRL's step (generation, loss,
                backward, optimizer), then runs the round's sides after it."""

                rss: PeakRSS | None = None
                start = cpu = 0.0
                round = 0

                def order(self) -> tuple[list[str], list[str]]:
                    order = round_order(names, self.round)
                    at = order.index("trl-hf")
                    return order[:at], order[at + 1 :]

                def on_step_begin(self, args, state, control, **kwargs):
                    if not counts["trl-hooked"]:
                        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
                        count_optimizer_steps(optimizer, counts, "trl-hf")
                        counts["trl-hooked"] = 1
                    run_ours(self.order()[0])
                    trainer.bench.clear()
                    self.rss = PeakRSS().__enter__()
                    self.start, self.cpu = time.perf_counter(), time.process_time()

                def on_step_end(self, args, state, control, **kwargs):
                    step_s, cpu_s = time.perf_counter() - self.start, time.process_time() - self.cpu
                    self.rss.__exit__(None, None, None)
                    steps["trl-hf"].append(trl_step(trainer.bench, step_s, cpu_s, self.rss))
                    run_ours(self.order()[1])
                    self.round += 1

            trainer = trl_trainer(
                task,
                model_dir,
                tmp / "trl",
                cfg,
                length,
                dtypes["trl-hf"],
                max_steps=rounds,
                callback=Alternate(),
            )
            trainer.train()
            changed = {"trl-hf": changed_weights(trainer.model, initial)}
        else:
            for index in range(rounds):
                run_ours(round_order(names, index))
            changed = {}
        changed |= {side: changed_weights(t.model, initial) for side, t in ours.items()}
    for name in used:
        gemm[name].append(gemm_rate(DTYPES[name]))
    timed = {side: records[cfg.warmup :] for side, records in steps.items()}
    check = {
        side: {
            "optimizer_steps_per_grpo_step": counts[side] / len(records),
            "max_weight_change": changed[side],
        }
        for side, records in steps.items()
    }
    return {
        "task": {**described, "samples_per_step": cfg.prompts_per_step * cfg.group_size},
        "dtypes": {side: dtypes[side] for side in steps},
        "gemm_flops": {name: max(rates) for name, rates in gemm.items()},
        "steps": timed,
        "update_check": check,
        "missing": missing,
    }


def probe_trl_vllm(cfg: StepBenchConfig, length: str, dtype: str) -> dict:
    """TRL with vLLM colocated, alone: build it and run one step; its step time, or why it cannot run."""
    if not have_trl():
        return {"error": "trl not installed (pip install 'crystal-grpo[bench]')"}
    if reason := vllm_unavailable():
        return {"error": reason}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host memory for its KV cache
    task = bench_task(cfg.size, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model(task.model(), task.tokenizer, tmp / "model")
        start = time.perf_counter()
        try:
            trainer = trl_trainer(
                task, model_dir, tmp / "trl", cfg, length, dtype, max_steps=1, use_vllm=True
            )
            built = time.perf_counter() - start
            trainer.train()
        except Exception as err:  # noqa: BLE001 - the failure is the result
            where = traceback.extract_tb(err.__traceback__)[-1]
            return {
                "error": f"{type(err).__name__}: {err} (at {Path(where.filename).name}:{where.lineno} "
                f"in {where.name}, {time.perf_counter() - start:.0f} s after the start)"
            }
    return {"built_s": built, "step_s": time.perf_counter() - start - built}


# ----------------------------------------------------------------------------------------------- summary


def flops_per_token(parameters: int, passes: int = 3) -> float:
    """FLOPs per token of ``passes`` matmul passes over a model (forward = 1, backward = 2): 2 per parameter
    and pass, so forward + backward is 6 x parameters."""
    return 2.0 * passes * parameters


def side_summary(records: list[dict], parameters: int, peak: float) -> dict:
    keys = [k for k in records[0] if isinstance(records[0][k], float | int)]
    out = {k: summarize([r[k] for r in records]) for k in keys}
    update_flops = [flops_per_token(parameters) * r["tokens"] / r["update_s"] for r in records]
    out["update_flops"] = summarize(update_flops)
    out["update_share_of_gemm_peak"] = statistics.median(update_flops) / peak
    out["ms_per_response_token"] = summarize([1e3 * r["step_s"] / r["response_tokens"] for r in records])
    return out


def repeat_means(records: list[dict], key: str, cfg: StepBenchConfig) -> list[float]:
    """Mean of ``key`` over each repeat's steps."""
    return [
        statistics.fmean(r[key] for r in records[i * cfg.steps : (i + 1) * cfg.steps])
        for i in range(cfg.repeats)
    ]


def pairing(ours: list[dict], trl: list[dict], cfg: StepBenchConfig) -> dict:
    """Ratios ours / TRL per repeat (step, each phase, step time per response token) and their spread."""
    for records in (ours, trl):
        for r in records:
            r["s_per_response_token"] = r["step_s"] / r["response_tokens"]
    out = {}
    for key in ("step_s", "cpu_s", *(f"{p}_s" for p in PHASES if p != "sync"), "s_per_response_token"):
        theirs = repeat_means(trl, key, cfg)
        if all(t > 0 for t in theirs):
            out[key] = spread([a / b for a, b in zip(repeat_means(ours, key, cfg), theirs, strict=True)])
    return out


def summarize_variant(raw: dict, cfg: StepBenchConfig) -> dict:
    parameters = raw["task"].get("parameters", 0)
    sides = {
        side: side_summary(records, parameters, raw["gemm_flops"][raw["dtypes"][side]])
        for side, records in raw["steps"].items()
    }
    ours = [s for s in sides if s.startswith("ours")]
    trl = [s for s in sides if s.startswith("trl")]
    pairings = {f"{a} / {b}": pairing(raw["steps"][a], raw["steps"][b], cfg) for a in ours for b in trl}
    out = {
        "task": raw["task"],
        "dtypes": raw["dtypes"],
        "gemm_flops": raw["gemm_flops"],
        "sides": sides,
        "pairings": pairings,
        "update_check": raw["update_check"],
        "missing": raw["missing"],
    }
    if ours and trl:
        fastest = lambda names: min(names, key=lambda s: sides[s]["step_s"]["median"])  # noqa: E731
        out["best"] = {"ours": fastest(ours), "trl": fastest(trl)}
        out["best"]["pairing"] = f"{out['best']['ours']} / {out['best']['trl']}"
    return out


def run(cfg: StepBenchConfig | None = None) -> dict:
    cfg = cfg or StepBenchConfig()
    for index, variant in enumerate(cfg.variants):
        length, dtype = parse_variant(variant)
        if dtype == "best" and not any(v.startswith(f"{length}-") for v in cfg.variants[:index]):
            raise ValueError(f"variant {variant!r} needs a {length}-float32 or -bfloat16 variant before it")
    config = json.dumps(asdict(cfg))
    result: dict = {"config": asdict(cfg), "flops_formula": FLOPS_FORMULA, "variants": {}, "missing": {}}
    if "trl-vllm" in cfg.sides:
        probe = child_json(
            "benchmarks.grpo_step",
            ["--probe", cfg.variants[0], "--config", config],
            cfg.child_timeout_s,
        )
        result["trl_vllm_probe"] = probe
        if "error" in probe:
            reason = f"TRL vllm_mode='colocate' cannot run a step here: {probe['error']}"
        else:
            reason = (
                f"TRL vllm_mode='colocate' ran one step alone ({probe['step_s']:.1f} s), but not in the "
                "alternating rotation: a second vLLM engine in one process can fail inside vLLM"
            )
        for variant in cfg.variants:
            result["missing"][f"{variant}/trl-vllm"] = reason
    for variant in cfg.variants:
        length, dtype = parse_variant(variant)
        sides = [s for s in cfg.sides if s != "trl-vllm"]
        dtypes = (
            best_dtypes(result["variants"], length, sides) if dtype == "best" else dict.fromkeys(sides, dtype)
        )
        raw = child_json(
            "benchmarks.grpo_step",
            ["--variant", variant, "--dtypes", json.dumps(dtypes), "--config", config],
            cfg.child_timeout_s,
        )
        if "error" in raw:
            for side in cfg.sides:
                result["missing"].setdefault(f"{variant}/{side}", f"the variant failed: {raw['error']}")
            continue
        summary = summarize_variant(raw, cfg)
        for side, reason in summary.pop("missing").items():
            result["missing"][f"{variant}/{side}"] = reason
        result["variants"][variant] = summary
    if cfg.isolated_memory and have_trl():
        variant = cfg.variants[0]
        result["alone"] = {
            side: child_json(
                "benchmarks.grpo_step", ["--alone", side, variant, "--config", config], cfg.child_timeout_s
            )
            for side in ("ours-hf", "trl-hf")
        }
    return result


def row_keys(result: dict) -> set[str]:
    """The rows present: "variant/side" for every side with timed steps."""
    return {f"{v}/{side}" for v, summary in result["variants"].items() for side in summary["sides"]}


def alone(side: str, variant: str, cfg: StepBenchConfig) -> dict:
    """One trainer alone for one step: RSS once it is built, and the peak RSS while it trains (sampled; the
    kernel's ru_maxrss would also count the set-up: tokenizer training, data loading)."""
    task = bench_task(cfg.size, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_model(task.model(), task.tokenizer, tmp / "model")
        length, dtype = parse_variant(variant)
        if side == "ours-hf":
            trainer = our_trainer(task, model_dir, tmp / "ours", cfg, length, dtype, "hf")
            with PeakRSS() as rss:
                trainer.step()
        else:
            trainer = trl_trainer(task, model_dir, tmp / "trl", cfg, length, dtype, max_steps=1)
            with PeakRSS() as rss:
                trainer.train()
    return {"rss_built_mb": rss.start / 2**20, "peak_rss_mb": rss.peak / 2**20}


# ----------------------------------------------------------------------------------------------- reporting


def dtype_label(dtype: str, dtypes: dict[str, str]) -> str:
    if dtype != "best":
        return dtype
    chosen = ", ".join(f"{side} {name}" for side, name in dtypes.items())
    return f"each side in its faster dtype of the variants above ({chosen})"


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_result(result: dict) -> None:
    for variant, summary in result["variants"].items():
        gemm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in summary["gemm_flops"].items())
        print(f"-- {variant}: {summary['dtypes']}; GEMM GFLOP/s {gemm}")
        sides = list(summary["sides"])
        print(f"{'':22s}" + "".join(f"{s:>12s}" for s in sides))
        keys = ("step_s", *(f"{p}_s" for p in PHASES), "response_tokens", "eos_rate", "cap_rate")
        for key in (*keys, "ms_per_response_token"):
            cells = [summary["sides"][s][key]["median"] for s in sides]
            print(f"{key:22s}" + "".join(f"{c:12.3f}" for c in cells))
        shares = [summary["sides"][s]["update_share_of_gemm_peak"] for s in sides]
        print(f"{'update / GEMM peak':22s}" + "".join(f"{c:12.3f}" for c in shares))
        for name, ratios in summary["pairings"].items():
            step = ratios["step_s"]
            print(
                f"{name}: step ratio {step['median']:.3f} [{step['min']:.3f}, {step['max']:.3f}] "
                f"{step['verdict']}"
            )
        if "best" in summary:
            print(f"best: {summary['best']['pairing']}")
    for row, reason in result["missing"].items():
        print(f"missing {row}: {reason}")


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["### GRPO step: ours vs TRL", ""]
    task = next((s["task"] for s in result["variants"].values()), None)
    if task:
        lines += [
            f"{task['model']}, {task['parameters'] / 1e6:.1f}M parameters, A.4 prompts of "
            f"{task['prompt_tokens_mean']:.0f} tokens; {cfg['prompts_per_step']} prompts x "
            f"{cfg['group_size']} samples = {task['samples_per_step']} per step, up to {cfg['max_new_tokens']} "
            f"new tokens, AdamW lr {cfg['lr']}, clip {cfg['clip_eps']}, k3 KL {cfg['kl_coef']} (reference model "
            f"on every side). Rounds of one step per side in rotating order; {cfg['warmup']} warm-up round(s), "
            f"then {cfg['repeats']} repeats of {cfg['steps']} round(s). Per-step figures: median over the "
            f"timed steps; ratios: ours / TRL per repeat, median [min, max], a tie when the spread crosses 1. "
            f"Update FLOP/s counted as {result['flops_formula']}.",
            "",
        ]
    for variant, summary in result["variants"].items():
        length, dtype = parse_variant(variant)
        sides = list(summary["sides"])
        lines += [
            f"#### {'fixed length (EOS suppressed on every side)' if length == 'fixed' else 'sampled length'}"
            f", {dtype_label(dtype, summary['dtypes'])}",
            "",
            "GEMM rate measured in this process: "
            + ", ".join(f"{v / 1e9:.0f} GFLOP/s ({k})" for k, v in summary["gemm_flops"].items())
            + ".",
            "",
            "| per step | " + " | ".join(sides) + " |",
            "| --- |" + " --- |" * len(sides),
        ]
        rows = [(f"{p} s", f"{p}_s", ".3g") for p in PHASES] + [
            ("**total s**", "step_s", ".3g"),
            ("CPU s (this process, all threads)", "cpu_s", ".3g"),
            ("generated tokens", "response_tokens", ".0f"),
            ("EOS rate", "eos_rate", ".2f"),
            ("cap rate", "cap_rate", ".2f"),
            ("ms per generated token (step)", "ms_per_response_token", ".1f"),
        ]
        for label, key, fmt in rows:
            cells = [_cell(summary["sides"][s][key]["median"], fmt) for s in sides]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cells = [
            f"{summary['sides'][s]['update_flops']['median'] / 1e9:.1f} "
            f"({100 * summary['sides'][s]['update_share_of_gemm_peak']:.0f} %)"
            for s in sides
        ]
        lines.append("| update GFLOP/s (share of GEMM peak) | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| ours / TRL | step | CPU time | generate | log-probs | update | per generated token |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, ratios in summary["pairings"].items():
            cells = []
            for key in ("step_s", "cpu_s", "generate_s", "logprob_s", "update_s", "s_per_response_token"):
                r = ratios.get(key)
                cells.append(
                    "-" if r is None else f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] {r['verdict']}"
                )
            best = " (best vs best)" if summary.get("best", {}).get("pairing") == name else ""
            lines.append(f"| {name}{best} | " + " | ".join(cells) + " |")
        check = summary["update_check"]
        same = all(
            c["optimizer_steps_per_grpo_step"] == 1 and c["max_weight_change"] > 0 for c in check.values()
        )
        lines += ["", f"One optimizer step per GRPO step and changed weights on every side: {same}.", ""]
        if "best" in summary:
            step = summary["pairings"][summary["best"]["pairing"]]["step_s"]
            target = cfg["target_ratio"]
            verdict = (
                "met"
                if step["max"] <= target
                else ("met on the median" if step["median"] <= target else "**missed**")
            )
            lines += [
                f"Best vs best ({summary['best']['pairing']}): {step['median']:.2f} "
                f"[{step['min']:.2f}, {step['max']:.2f}]; target <= {target}: {verdict}.",
                "",
            ]
    alone_rows = result.get("alone", {})
    if alone_rows and all("error" not in a for a in alone_rows.values()):
        ours, theirs = alone_rows["ours-hf"], alone_rows["trl-hf"]
        lines += [
            f"Peak RSS while training, each alone in a fresh process ({cfg['variants'][0]}, one step): ours-hf "
            f"{ours['peak_rss_mb']:.0f} MB, trl-hf {theirs['peak_rss_mb']:.0f} MB "
            f"({ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}).",
            "",
        ]
    for row, reason in result["missing"].items():
        lines.append(f"- missing {row}: {reason}")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration the smoke test runs")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    internal = parser.add_mutually_exclusive_group()
    internal.add_argument("--variant", help="internal: run one variant, raw steps as JSON")
    internal.add_argument("--probe", metavar="VARIANT", help="internal: TRL with vLLM alone, one step")
    internal.add_argument("--alone", nargs=2, metavar=("SIDE", "VARIANT"), help="internal: memory alone")
    parser.add_argument("--dtypes", help="internal: with --variant, each side's dtype, as JSON")
    parser.add_argument("--config", help="internal: the StepBenchConfig, as JSON")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else StepBenchConfig()
    if args.config:
        values = json.loads(args.config)
        cfg = replace(
            StepBenchConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )
    for internal_run, fn in (
        (args.variant, lambda: run_variant(cfg, args.variant, json.loads(args.dtypes))),
        (args.probe, lambda: probe_trl_vllm(cfg, *parse_variant(args.probe))),
        (args.alone, lambda: alone(args.alone[0], args.alone[1], cfg)),
    ):
        if internal_run:
            result = fn()
            print(json.dumps(result))
            return result
    result = run(cfg)
    print_result(result)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()

"""Weight sync: milliseconds per push of the trainer's weights into the vLLM engine, against model size, and as
a share of our GRPO step.

For each small model size and each way to reach the engine (``modes``):

    in-process                 VLLMGenerator: the engine in the trainer's process, in-place reload by reference
    worker/shared_memory       VLLMServerGenerator, sync_transport="shared_memory": one copy into a shared
                               buffer (mapped by both processes), the worker reloads from views of it
    worker/broadcast           VLLMServerGenerator, sync_transport="broadcast": buckets over gloo

a generator is built from the saved model in a fresh process (one vLLM engine per process) and
``load_weights`` is timed ``repeats`` times after one warm-up push (the weights are perturbed between pushes
so nothing can be skipped). The step each sync is a share of: one of our GRPO steps per size (``step_mode``'s
generator, the grpo_step benchmark's workload: ``prompts_per_step`` x ``group_size`` samples, up to
``max_new_tokens`` tokens, a reference model), after one warm-up step. Needs the ``vllm`` extra; without it
every row is missing, with the reason.

    python -m benchmarks.weight_sync [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import (
    bench_task,
    child_json,
    summarize,
    vllm_unavailable,
    write_result,
)
from grpo.generation import GeneratorConfig
from grpo.models import MODEL_SIZES, build_small_model, count_parameters, save_model
from grpo.trainer import GRPOConfig

MODES = ("in-process", "worker/shared_memory", "worker/broadcast")


@dataclass
class SyncBenchConfig:
    sizes: tuple[str, ...] = ("tiny", "small", "base")
    modes: tuple[str, ...] = MODES
    repeats: int = 5
    # the step a sync is a share of (0 steps: not measured)
    step_mode: str = "worker/shared_memory"
    steps: int = 1
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 128
    target_share: float = 0.05  # issue 18: a sync under 5 % of the step
    child_timeout_s: float = 3600.0


QUICK = SyncBenchConfig(
    sizes=("tiny",),
    modes=("worker/shared_memory",),
    repeats=2,
    prompts_per_step=1,
    group_size=4,
    max_new_tokens=8,
)


def build_generator(mode: str, model_dir: Path, tokenizer):
    from grpo.vllm_generator import VLLMGenerator, VLLMServerGenerator

    if mode == "in-process":
        return VLLMGenerator(model_dir, tokenizer, GeneratorConfig(kind="vllm", dtype="float32"))
    transport = mode.removeprefix("worker/")
    config = GeneratorConfig(kind="vllm-server", dtype="float32", sync_transport=transport)
    return VLLMServerGenerator(model_dir, tokenizer, config)


def time_sync(generator, model: torch.nn.Module, repeats: int) -> list[dict]:
    times = []
    for version in range(repeats + 1):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # a changed weight each time
        generator.load_weights(model, version + 1)
        times.append(dict(generator.last_sync))
    return times[1:]  # the first push is a warm-up (and plans the buffers)


def time_step(generator, model, task, cfg: SyncBenchConfig, run_dir: Path) -> list[dict]:
    """Our GRPO step with this generator: a warm-up step, then ``cfg.steps`` timed; time and sync per step."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    samples = cfg.prompts_per_step * cfg.group_size
    config = GRPOConfig(
        total_steps=10**6,
        prompts_per_step=cfg.prompts_per_step,
        group_size=cfg.group_size,
        micro_batch_size=samples,
        lr=1e-5,
        max_new_tokens=cfg.max_new_tokens,
    )
    trainer = task.trainer(model, generator, config, run_dir, ref)
    generator.load_weights(model, trainer.weight_version)  # the engine at the trainer's version again
    metrics = [trainer.step() for _ in range(cfg.steps + 1)][1:]
    return [{"step_s": m["time_step"], "sync_s": m["time_sync"]} for m in metrics]


def one_row(size: str, mode: str, cfg: SyncBenchConfig) -> dict:
    """One size and mode in this process: sync times, and the step when ``mode`` is ``cfg.step_mode``."""
    task = bench_task("tiny")
    model = build_small_model(size, task.tokenizer).float()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(model, task.tokenizer, Path(tmp) / size)
        generator = build_generator(mode, model_dir, task.tokenizer)
        try:
            syncs = time_sync(generator, model, cfg.repeats)
            steps = []
            if mode == cfg.step_mode and cfg.steps:
                steps = time_step(generator, model, task, cfg, Path(tmp) / "run")
        finally:
            close = getattr(generator, "close", None)
            if callable(close):
                close()
    ms = [s["ms"] for s in syncs]
    row = {
        "size": size,
        "mode": mode,
        "parameters": count_parameters(model),
        "hidden": MODEL_SIZES[size].hidden_size,
        "mb": syncs[-1]["bytes"] / 2**20,
        "ms": summarize(ms),
        "gb_per_s": syncs[-1]["bytes"] / 2**30 / (summarize(ms)["median"] / 1e3),
    }
    if "worker_ms" in syncs[-1]:
        row["worker_reload_ms"] = summarize([s["worker_ms"] for s in syncs])
    if steps:
        row["step_s"] = summarize([s["step_s"] for s in steps])
    return row


def run(cfg: SyncBenchConfig | None = None) -> dict:
    cfg = cfg or SyncBenchConfig()
    unknown = sorted(set(cfg.modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {MODES}")
    rows, missing = [], {}
    reason = vllm_unavailable()
    config = json.dumps(asdict(cfg))
    for size in cfg.sizes:
        for mode in cfg.modes:
            if reason is not None:
                missing[f"{size}/{mode}"] = reason
                continue
            row = child_json(
                "benchmarks.weight_sync", ["--row", size, mode, "--config", config], cfg.child_timeout_s
            )
            if "error" in row:
                missing[f"{size}/{mode}"] = row["error"]
            else:
                rows.append(row)
    for size in cfg.sizes:  # every mode's sync as a share of this size's step
        step = next((r["step_s"]["median"] for r in rows if r["size"] == size and "step_s" in r), None)
        for r in rows:
            if r["size"] == size and step:
                r["share_of_step"] = r["ms"]["median"] / 1e3 / step
    return {"config": asdict(cfg), "rows": rows, "missing": missing}


def row_keys(result: dict) -> set[str]:
    return {f"{r['size']}/{r['mode']}" for r in result["rows"]}


def print_result(result: dict) -> None:
    for r in result["rows"]:
        share = f"{100 * r['share_of_step']:.2f} % of a step" if "share_of_step" in r else ""
        print(
            f"{r['size']:6s} {r['mode']:22s} {r['parameters'] / 1e6:6.1f}M params {r['mb']:8.1f} MB "
            f"{r['ms']['median']:8.1f} ms  {r['gb_per_s']:.2f} GB/s  {share}"
        )
    for row, reason in result["missing"].items():
        print(f"missing {row}: {reason}")


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = ["### Weight sync (trainer -> vLLM)", ""]
    if result["rows"]:
        lines += [
            f"Median of {cfg['repeats']} pushes after a warm-up, each size and mode in a fresh process; the step "
            f"is one of our GRPO steps with the {cfg['step_mode']} generator ({cfg['prompts_per_step']} x "
            f"{cfg['group_size']} samples, up to {cfg['max_new_tokens']} new tokens, reference model), after a "
            "warm-up step.",
            "",
            "| model | parameters | MB | mode | ms per sync | worker reload ms | GB/s | our step s | "
            "sync share of the step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        steps = {r["size"]: r["step_s"]["median"] for r in result["rows"] if "step_s" in r}
        for r in result["rows"]:
            reload_ms = f"{r['worker_reload_ms']['median']:.1f}" if "worker_reload_ms" in r else "-"
            step = f"{steps[r['size']]:.1f}" if r["size"] in steps else "-"
            share = f"{100 * r['share_of_step']:.2f} %" if "share_of_step" in r else "-"
            lines.append(
                f"| {r['size']} | {r['parameters'] / 1e6:.1f}M | {r['mb']:.0f} | {r['mode']} | "
                f"{r['ms']['median']:.1f} | {reload_ms} | {r['gb_per_s']:.2f} | {step} | {share} |"
            )
        shares = [r["share_of_step"] for r in result["rows"] if "share_of_step" in r]
        if shares:
            verdict = "met" if max(shares) < cfg["target_share"] else "**missed**"
            lines += [
                "",
                f"Largest sync share of a step {100 * max(shares):.2f} % (target < "
                f"{100 * cfg['target_share']:.0f} %: {verdict}).",
            ]
    for row, reason in result["missing"].items():
        lines.append(f"- missing {row}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration the smoke test runs")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--row", nargs=2, metavar=("SIZE", "MODE"), help="internal: one row, as JSON")
    parser.add_argument("--config", help="internal: the SyncBenchConfig, as JSON")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else SyncBenchConfig()
    if args.config:
        values = json.loads(args.config)
        cfg = replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if args.row:
        row = one_row(*args.row, cfg)
        print(json.dumps(row))
        return row
    result = run(cfg)
    print_result(result)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()

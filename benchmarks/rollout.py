"""Rollout throughput: generated tokens/s and samples/s of the HF generator (and of the vLLM generator when
``grpo.vllm_generator`` is importable), swept over the number of samples per call.

Each call samples ``batch`` responses (``batch / group`` prompts x ``group`` samples) of at most
``max_new_tokens`` tokens from the same tiny model and A.4 prompts; one warm-up call, then ``repeats`` timed
calls (the median is reported). Only sampled response tokens count as generated tokens.

    python -m benchmarks.rollout [--quick] [--out FILE.json]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass

from benchmarks.common import (
    BenchTask,
    PeakRSS,
    bench_task,
    build_vllm_generator,
    cuda_peak_bytes,
    simple_main,
    summarize,
    vllm_unavailable,
)
from grpo.generation import HFGenerator, SamplingConfig
from grpo.models import save_model


@dataclass
class RolloutBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    group_size: int = 8
    max_new_tokens: int = 64
    repeats: int = 3
    size: str = "tiny"
    seed: int = 0


QUICK = RolloutBenchConfig(batch_sizes=(1, 4), max_new_tokens=8, repeats=1)


def time_generator(generator, task: BenchTask, batch: int, cfg: RolloutBenchConfig) -> dict:
    """Warm-up call, then ``cfg.repeats`` timed calls of ``batch`` samples; medians and peak RSS growth."""
    group = min(cfg.group_size, batch)
    prompts = [p.text for p in task.prompts[: max(1, batch // group)]]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    generator.generate(prompts, group, sampling)
    seconds, tokens = [], []
    with PeakRSS() as rss:
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            rollout = generator.generate(prompts, group, sampling)
            seconds.append(time.perf_counter() - start)
            tokens.append(int(rollout.response_mask.sum()))
    median_s = summarize(seconds)["median"]
    return {
        "batch": len(prompts) * group,
        "seconds": summarize(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "samples_per_s": len(prompts) * group / median_s,
        "response_tokens_mean": sum(tokens) / len(tokens) / (len(prompts) * group),
        "peak_rss_growth_mb": rss.growth / 2**20,
        "cuda_peak_mb": None if cuda_peak_bytes() is None else cuda_peak_bytes() / 2**20,
    }


def run(cfg: RolloutBenchConfig | None = None) -> dict:
    cfg = cfg or RolloutBenchConfig()
    task = bench_task(cfg.size)
    model = task.model().eval()
    rows = []
    for batch in cfg.batch_sizes:
        hf = HFGenerator(model, task.tokenizer, batch_size=batch)
        rows.append({"generator": "hf", **time_generator(hf, task, batch, cfg)})
    note = vllm_unavailable()
    if note is None:
        with tempfile.TemporaryDirectory() as tmp:
            vllm = build_vllm_generator("colocated", save_model(model, task.tokenizer, tmp), task.tokenizer)
            for batch in cfg.batch_sizes:
                rows.append({"generator": "vllm", **time_generator(vllm, task, batch, cfg)})
            del vllm
        hf_rate = {r["batch"]: r["tokens_per_s"] for r in rows if r["generator"] == "hf"}
        for r in rows:
            if r["generator"] == "vllm":
                r["ratio_vs_hf"] = r["tokens_per_s"] / hf_rate[r["batch"]]
        note = "target: vLLM faster than HF at batch >= 32"
    return {
        "config": asdict(cfg),
        "task": task.describe(model),
        "rows": rows,
        "note": note,
    }


def print_result(result: dict) -> None:
    print(f"{'generator':9s} {'batch':>5s} {'tokens/s':>9s} {'samples/s':>9s} {'s/call':>7s} {'RSS+ MB':>8s}")
    for r in result["rows"]:
        print(
            f"{r['generator']:9s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {r['samples_per_s']:9.2f} "
            f"{r['seconds']['median']:7.2f} {r['peak_rss_growth_mb']:8.1f}"
        )
    if result["note"]:
        print(f"note: {result['note']}")


def main(argv: list[str] | None = None) -> dict:
    return simple_main(__doc__, run, RolloutBenchConfig(), QUICK, print_result, argv)


if __name__ == "__main__":
    main()


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "### Rollout",
        "",
        f"{result['task']['model']}; batch = samples per call (batch / {cfg['group_size']} prompts x "
        f"{cfg['group_size']} samples; fewer samples: one prompt), up to "
        f"{cfg['max_new_tokens']} new tokens; median of {cfg['repeats']} calls after a warm-up.",
        "",
        "| generator | batch | tokens/s | samples/s | s per call | RSS growth MB | vs HF |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_hf']:.2f}" if "ratio_vs_hf" in r else "-"
        lines.append(
            f"| {r['generator']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['samples_per_s']:.2f} | "
            f"{r['seconds']['median']:.2f} | {r['peak_rss_growth_mb']:.0f} | {ratio} |"
        )
    big = [r["ratio_vs_hf"] for r in result["rows"] if "ratio_vs_hf" in r and r["batch"] >= 32]
    if big:
        verdict = "met" if min(big) > 1 else "**missed**"
        lines += ["", f"vLLM / HF tokens/s at batch >= 32: {min(big):.1f}x or more (target > 1: {verdict})."]
    elif result["note"]:
        lines += ["", result["note"]]
    return "\n".join(lines)

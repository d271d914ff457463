"""Rollout throughput: generated tokens/s and samples/s of the HF generator (and of the vLLM generator when
``grpo.vllm_generator`` is importable), swept over the number of samples per call; and the cost of each
constrained-decoding mode (grpo.constraint with crystals.grammar's grammars) at one batch size.

Each call samples ``batch`` responses (``batch / group`` prompts x ``group`` samples) of at most
``max_new_tokens`` tokens from the same tiny model and A.4 prompts; one warm-up call, then ``repeats`` timed
calls (the median is reported). Only sampled response tokens count as generated tokens.

Constraints: the same call at ``constraint_batch`` samples under each mode of ``constraints`` (the grammar of
``structure_grammar(mode, prompt formula)`` per prompt), modes alternating within each repeat (forwards, then
backwards) so they share the machine's load. A grammar ends responses where it may, so the modes generate
different numbers of tokens (on this untrained model a constrained response is much shorter); the overhead is
therefore per unit of decoding work: HF decodes every row until the longest is done (rows x decoding steps,
finished rows padded), vLLM only the real tokens. Neither is exact for vLLM: its step costs nearly the same
however few rows are left, so real tokens charge a mode its short responses, and rows x steps credits them
(the markdown gives both). Overhead = work/s(none) / work/s(mode) - 1 (target <= 0.15 at batch 32). A vLLM
call's time includes replaying its masks (the trainer scores with them). Each repeat samples with a seed of
its own (the same for every mode), so no repeat finds the rules' caches filled by the one before, as a
training step would not. An HF row also gives the constraint's own time: the seconds spent in its logits
processor (grammar and rules) over the rest of the call, which the machine's noise between calls does not
blur. HF has two more modes, the
formula grammar with crystals' token rules (which read each row's text): ``formula+separation`` at
``separation``, and ``formula+volume+separation`` adding the cell-volume rule at ``volume_floor`` and
``volume_ceiling`` (the demo's default sampling); the separation rule builds a free grid per atom written, so
its cost grows with the atoms written.

    python -m benchmarks.rollout [--quick] [--out FILE.json]
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from crystals.cell_volume import CellVolumeRule
from crystals.grammar import structure_grammar
from crystals.separation import SeparationRule
from grpo.constraint import ConstraintLogitsProcessor, TokenRule, TokenRules
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
    constraints: tuple[str, ...] = ("none", "format", "elements", "formula")
    constraint_batch: int = 32
    constraint_repeats: int = 6  # the modes differ by a few %: more calls than the sweep's
    separation: float = 0.5  # the HF-only rule modes' separation scale (0: no such rows)
    volume_floor: float = 0.9  # and the cell-volume rule's bounds (both 0: no "formula+volume+separation")
    volume_ceiling: float = 150.0
    target_overhead: float = 0.15


QUICK = RolloutBenchConfig(
    batch_sizes=(1, 4),
    max_new_tokens=8,
    repeats=1,
    constraints=("none", "formula"),
    constraint_batch=4,
    constraint_repeats=1,
)


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


@contextmanager
def processor_seconds() -> Iterator[list[float]]:
    """The seconds each call of an HF constraint's logits processor takes inside the block, as they come."""
    calls: list[float] = []
    process = ConstraintLogitsProcessor.__call__

    def timed(self, input_ids, scores):
        start = time.perf_counter()
        try:
            return process(self, input_ids, scores)
        finally:
            calls.append(time.perf_counter() - start)

    ConstraintLogitsProcessor.__call__ = timed
    try:
        yield calls
    finally:
        ConstraintLogitsProcessor.__call__ = process


def time_constraints(generators: dict, kind: str, task: BenchTask, cfg: RolloutBenchConfig) -> list[dict]:
    """One row per constraint mode (`generators`: mode -> the generator that samples it) at
    ``constraint_batch`` samples: tokens/s, decoding work/s and the overhead over "none" (see the module
    docstring). A mode "GRAMMAR+RULE" samples GRAMMAR's grammar with that generator's rule."""
    modes = list(generators)
    group = min(cfg.group_size, cfg.constraint_batch)
    prompts = task.prompts[: max(1, cfg.constraint_batch // group)]
    specs = {
        mode: None
        if mode == "none"
        else [structure_grammar(mode.split("+")[0], p.meta["formula"]) for p in prompts]
        for mode in modes
    }
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    texts = [p.text for p in prompts]
    for mode in modes:  # warm-up, and each grammar compiled once outside the timing
        generators[mode].generate(texts, group, sampling, specs[mode])
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    own: dict[str, list[float]] = {mode: [] for mode in modes}  # in the HF constraint's processor
    tokens: dict[str, list[int]] = {mode: [] for mode in modes}
    work: dict[str, list[int]] = {mode: [] for mode in modes}
    steps: dict[str, list[int]] = {mode: [] for mode in modes}  # rows x steps
    for repeat in range(cfg.constraint_repeats):
        order = modes if repeat % 2 == 0 else modes[::-1]
        drawn = dataclasses.replace(sampling, seed=cfg.seed + 1 + repeat)  # not the warm-up's samples
        for mode in order:
            with processor_seconds() as processing:
                start = time.perf_counter()
                rollout = generators[mode].generate(texts, group, drawn, specs[mode])
                seconds[mode].append(time.perf_counter() - start)
            own[mode].append(sum(processing))
            tokens[mode].append(int(rollout.response_mask.sum()))
            # HF decodes every row for the batch's longest response; vLLM only each response's own tokens
            work[mode].append(rollout.response_ids.numel() if kind == "hf" else tokens[mode][-1])
            steps[mode].append(rollout.response_ids.numel())
    rows = []
    for mode in modes:
        rows.append(
            {
                "generator": kind,
                "constraint": mode,
                "batch": len(prompts) * group,
                "seconds": summarize(seconds[mode]),
                "tokens_per_s": sum(tokens[mode]) / sum(seconds[mode]),
                "work_per_s": sum(work[mode]) / sum(seconds[mode]),
                "row_steps_per_s": sum(steps[mode]) / sum(seconds[mode]),
                "response_tokens_mean": sum(tokens[mode]) / len(tokens[mode]) / (len(prompts) * group),
            }
        )
        if kind == "hf":  # (vLLM's constraint runs inside its engine)
            rows[-1]["own_overhead"] = sum(own[mode]) / (sum(seconds[mode]) - sum(own[mode]))
    base = next((r for r in rows if r["constraint"] == "none"), None)
    for r in rows:
        if base is not None:
            r["overhead"] = base["work_per_s"] / r["work_per_s"] - 1
            r["overhead_per_step"] = base["row_steps_per_s"] / r["row_steps_per_s"] - 1
    return rows


def rule_modes(cfg: RolloutBenchConfig) -> dict[str, TokenRule]:
    """The HF-only modes "formula+RULES" and their token rules (a vLLM engine runs the grammar alone)."""
    if not cfg.separation:
        return {}
    modes: dict[str, TokenRule] = {"formula+separation": SeparationRule(cfg.separation)}
    if cfg.volume_floor or cfg.volume_ceiling:
        volume = CellVolumeRule(cfg.volume_floor, cfg.volume_ceiling)
        modes["formula+volume+separation"] = TokenRules([volume, SeparationRule(cfg.separation)])
    return modes


def run(cfg: RolloutBenchConfig | None = None) -> dict:
    cfg = cfg or RolloutBenchConfig()
    task = bench_task(cfg.size)
    model = task.model().eval()
    rows, constrained = [], []
    for batch in cfg.batch_sizes:
        hf = HFGenerator(model, task.tokenizer, batch_size=batch)
        rows.append({"generator": "hf", **time_generator(hf, task, batch, cfg)})
    hf = HFGenerator(model, task.tokenizer, batch_size=cfg.constraint_batch)
    hf_modes = dict.fromkeys(cfg.constraints, hf)
    for mode, rule in rule_modes(cfg).items():
        hf_modes[mode] = HFGenerator(model, task.tokenizer, batch_size=cfg.constraint_batch, token_rule=rule)
    constrained += time_constraints(hf_modes, "hf", task, cfg)
    missing = {}
    reason = vllm_unavailable()
    if reason is None:
        with tempfile.TemporaryDirectory() as tmp:
            vllm = build_vllm_generator("colocated", save_model(model, task.tokenizer, tmp), task.tokenizer)
            for batch in cfg.batch_sizes:
                rows.append({"generator": "vllm", **time_generator(vllm, task, batch, cfg)})
            constrained += time_constraints(dict.fromkeys(cfg.constraints, vllm), "vllm", task, cfg)
            del vllm
        hf_rate = {r["batch"]: r["tokens_per_s"] for r in rows if r["generator"] == "hf"}
        for r in rows:
            if r["generator"] == "vllm":
                r["ratio_vs_hf"] = r["tokens_per_s"] / hf_rate[r["batch"]]
        note = "target: vLLM faster than HF at batch >= 32"
    else:
        note = reason
        missing = {f"vllm/{b}": reason for b in cfg.batch_sizes}
        missing |= {f"constraint/vllm/{mode}": reason for mode in cfg.constraints}
    return {
        "config": asdict(cfg),
        "task": task.describe(model),
        "rows": rows,
        "constraint_rows": constrained,
        "missing": missing,
        "note": note,
    }


def row_keys(result: dict) -> set[str]:
    """The rows present: "generator/batch" and "constraint/generator/mode"."""
    keys = {f"{r['generator']}/{r['batch']}" for r in result["rows"]}
    return keys | {f"constraint/{r['generator']}/{r['constraint']}" for r in result["constraint_rows"]}


def print_result(result: dict) -> None:
    print(f"{'generator':9s} {'batch':>5s} {'tokens/s':>9s} {'samples/s':>9s} {'s/call':>7s} {'RSS+ MB':>8s}")
    for r in result["rows"]:
        print(
            f"{r['generator']:9s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {r['samples_per_s']:9.2f} "
            f"{r['seconds']['median']:7.2f} {r['peak_rss_growth_mb']:8.1f}"
        )
    for r in result["constraint_rows"]:
        overhead = f"{100 * r['overhead']:+.0f} %" if "overhead" in r else "-"
        print(
            f"{r['generator']:5s} {r['constraint']:25s} batch {r['batch']:3d} {r['tokens_per_s']:9.1f} tokens/s "
            f"{r['work_per_s']:9.1f} decoded/s  overhead {overhead}"
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
    if result["constraint_rows"]:
        lines += [
            "",
            f"Constrained decoding at batch {cfg['constraint_batch']} (grammar per prompt from "
            "crystals.grammar.structure_grammar; modes alternating; overhead = decoding work/s without a "
            "constraint over with it, minus 1: HF decodes rows x steps, vLLM real tokens; vLLM's time includes "
            "replaying the masks; per step: rows x steps for both; its own time: HF's seconds in the "
            "constraint's logits processor over the rest of the call; a seed per repeat, "
            f"{cfg['constraint_repeats']} repeats):",
            "",
            "| generator | constraint | tokens/s | decoding work/s | tokens per response | overhead | "
            "per step | its own time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in result["constraint_rows"]:
            overhead = f"{100 * r['overhead']:+.1f} %" if "overhead" in r else "-"
            per_step = f"{100 * r['overhead_per_step']:+.1f} %" if "overhead_per_step" in r else "-"
            own = f"{100 * r['own_overhead']:.1f} %" if "own_overhead" in r else "-"
            lines.append(
                f"| {r['generator']} | {r['constraint']} | {r['tokens_per_s']:.1f} | {r['work_per_s']:.1f} | "
                f"{r['response_tokens_mean']:.1f} | {overhead} | {per_step} | {own} |"
            )
        worst = max((r["overhead"] for r in result["constraint_rows"] if "overhead" in r), default=None)
        if worst is not None:
            verdict = "met" if worst <= cfg["target_overhead"] else "**missed**"
            lines += [
                "",
                f"Largest overhead {100 * worst:.1f} % (target <= {100 * cfg['target_overhead']:.0f} %: "
                f"{verdict}).",
            ]
        own = max((r["own_overhead"] for r in result["constraint_rows"] if "own_overhead" in r), default=None)
        if own is not None:
            lines[-1] += f" HF's largest own time {100 * own:.1f} %."
    for row, reason in result.get("missing", {}).items():
        lines.append(f"- missing {row}: {reason}")
    return "\n".join(lines)

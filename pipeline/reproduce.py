"""`crystal-grpo reproduce`: the paper's experiment at a scale this machine affords, resumable arm by arm.

Stages, each recorded in RUN/stages.json with its wall time and skipped once done:
  sft-model     one SFT model (RUN/sft) every arm but `base` starts from;
  arm:NAME      per arm of the preset (configs/reproduce.toml): GRPO from the SFT model when the arm trains
                (RUN/arms/NAME), then samples for held-out test formulas (RUN/samples/NAME.jsonl);
  evaluate      relaxation of every arm's samples (CHGNet, A.2 settings), Tables 1 and 2 (RUN/report);
  rescore       the relaxed structures re-scored by SevenNet-0 (the independent check);
  report        RUN/report/reproduction.md and reproduction.json: each metric with its 95 % bootstrap
                interval, every trained arm against its baseline, the reward-hack analysis.
Every run directory holds its resolved config.toml, so a rerun with changed settings is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crystals.data import split_formulas
from grpo.config import read_toml
from grpo.models import packaged_smollm2_gguf
from pipeline.config import (
    PipelineError,
    RunConfig,
    load_configs,
    preset_path,
    refuse_changed_settings,
    save_resolved_config,
)
from pipeline.demo import DEMO_SECTIONS, StageLog
from pipeline.runs import build_reward_fn, console, run_grpo, run_sft, samples_summary, write_samples


@dataclass
class ReproduceConfig:
    """What the reproduction adds to the run configs; arms set `policy`."""

    # "rl": GRPO from the SFT model; "sft": the SFT model as it is; "base": the untuned instruct model
    policy: Literal["rl", "sft", "base"] = "rl"
    baseline: str = "sft"  # the arm a trained arm is compared with
    rescore: str = "sevenn"  # re-score the relaxed structures with this relaxer's potential ("": off)
    bootstrap: int = 2000  # resamples for the 95 % intervals
    # "smollm2": the packaged SmolLM2-135M-Instruct GGUF; "initial": the SFT run's starting model (a fresh small
    # model; the tiny preset's stand-in); else a path or hub name
    base_model: str = "smollm2"
    base_formulas: int = 32  # test formulas for the slow zero-shot row

    def __post_init__(self) -> None:
        if self.bootstrap < 100 or self.base_formulas < 1:
            raise ValueError("reproduce.bootstrap must be >= 100 and reproduce.base_formulas >= 1")


# the demo's tables, and what the reproduction adds
SECTIONS: dict[str, type] = {**DEMO_SECTIONS, "reproduce": ReproduceConfig}
SCALES = ("cpu", "tiny", "paper")


def reproduce_preset(scale: str) -> Path:
    """configs/reproduce.toml (cpu), reproduce-tiny.toml (minutes, CI) or reproduce-paper.toml (GPUs)."""
    if scale not in SCALES:
        raise PipelineError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    return preset_path("reproduce" if scale == "cpu" else f"reproduce-{scale}")


def arm_changes(name: str, arms: dict, chain: tuple[str, ...] = ()) -> dict:
    """An arm's `table.key = value` overrides: those of the arm it names in `from` (a variant of it), then
    its own."""
    changes = arms[name]
    if not isinstance(changes, dict):
        raise PipelineError(f"arms.{name} must be a table of table.key = value overrides")
    own = {key: value for key, value in changes.items() if key != "from"}
    parent = changes.get("from")
    if parent is None:
        return own
    if parent not in arms:
        raise PipelineError(f"arms.{name}: from {parent!r} is not an arm")
    if parent in (*chain, name):
        raise PipelineError(f"arms.{name}: `from` loops ({' -> '.join((*chain, name, parent))})")
    return {**arm_changes(parent, arms, (*chain, name)), **own}


def load_arms(path: Path, overrides: list[str]) -> tuple[dict, dict[str, dict]]:
    """(shared configs, {arm: its configs}): each arm's `table.key = value` overrides on the shared ones."""
    arms = read_toml(path).get("arms")
    if not isinstance(arms, dict) or not arms:
        raise PipelineError(f"{path} has no [arms.NAME] tables")
    shared = load_configs(SECTIONS, path, overrides, other_tables=True)
    configs = {}
    for name in arms:
        arm_overrides = [f"{key}={value}" for key, value in arm_changes(name, arms).items()]
        configs[name] = load_configs(SECTIONS, path, [*overrides, *arm_overrides], other_tables=True)
    for name, arm in configs.items():
        if arm["reproduce"].policy == "rl" and arm["reproduce"].baseline not in configs:
            raise PipelineError(f"arm {name}: baseline {arm['reproduce'].baseline!r} is not an arm")
    return shared, configs


def sft_model(out: Path, shared: dict) -> Path:
    """The SFT model every arm but `base` starts from (RUN/sft)."""
    record = {"run": shared["run"], "sft": shared["sft"]}
    refuse_changed_settings(out / "sft", record, resume=True)
    return run_sft(shared["run"], shared["sft"], out / "sft", record=record)


def base_model_path(out: Path, reproduce: ReproduceConfig) -> str:
    if reproduce.base_model == "smollm2":
        return str(packaged_smollm2_gguf())
    if reproduce.base_model == "initial":
        return str(out / "sft" / "initial_model")
    return reproduce.base_model


def needs_sft_model(arm: dict) -> bool:
    reproduce = arm["reproduce"]
    return reproduce.policy != "base" or reproduce.base_model == "initial"


def run_arm(out: Path, name: str, configs: dict) -> Path:
    """Train (when the arm trains) and sample one arm; returns its samples file."""
    run, reproduce, sample = configs["run"], configs["reproduce"], configs["sample"]
    model = str(out / "sft" / "final_model")
    if reproduce.policy == "rl":
        arm_dir = out / "arms" / name
        record = {key: configs[key] for key in ("run", "grpo", "reward", "generator")}
        refuse_changed_settings(arm_dir, record, resume=True)
        reward_fn = build_reward_fn(configs["reward"], run.data_dir, run.max_atoms)
        grpo_run = RunConfig(**{**vars(run), "model": model})
        model = str(
            run_grpo(grpo_run, configs["grpo"], configs["generator"], reward_fn, arm_dir, record=record)
        )
    elif reproduce.policy == "base":
        try:
            model = base_model_path(out, reproduce)
        except FileNotFoundError as err:
            raise PipelineError(f"arm {name}: {err}") from None
    count = reproduce.base_formulas if reproduce.policy == "base" else sample.num_formulas
    formulas = split_formulas(sample.split, run.data_dir, seed=sample.seed, limit=count)
    path = out / "samples" / f"{name}.jsonl"
    records = write_samples(run, model, sample, path, formulas, configs["generator"])
    console.print(f"{name}: {samples_summary(records, run.max_atoms)}", markup=False)
    return path


def reproduce(
    out: Path, shared: dict, arms: dict[str, dict], only: list[str] | None = None, partial: bool = False
) -> StageLog:
    """Run (or continue) the SFT model and the arms (`only`: these, else all unless `partial`), then evaluate
    and report the arms whose samples exist: after a plain run, after the last arm, or (`partial`) now. The
    evaluation stages record the arms they took in; one over more arms runs again and relaxes only the new
    samples."""
    unknown = sorted(set(only or []) - set(arms))
    if unknown:
        raise PipelineError(f"unknown arm(s) {unknown}; the preset has {', '.join(arms)}")
    refuse_changed_settings(out, shared, resume=True)
    stages = StageLog(out / "stages.json")
    if partial and not only and not any(stages.done(f"arm:{name}") for name in arms):
        raise PipelineError(f"{out} has no finished arm to report yet")
    save_resolved_config(out, shared)
    chosen = only or ([] if partial else list(arms))
    if any(needs_sft_model(arms[name]) for name in chosen):
        stages.run("sft-model", lambda: sft_model(out, shared))
    for name in chosen:
        stages.run(f"arm:{name}", lambda name=name: run_arm(out, name, arms[name]))
    done = [name for name in arms if stages.done(f"arm:{name}")]
    if only is None or partial or len(done) == len(arms):
        stages.run("evaluate", lambda: evaluate_arms(out, shared, done), covers=done)
        if shared["reproduce"].rescore:
            stages.run("rescore", lambda: rescore_arms(out, shared, done), covers=done)
        stages.run("report", lambda: write_report(out, shared, arms, done), covers=done)
    return stages


def evaluate_arms(out: Path, shared: dict, names: list[str]) -> None:
    from evaluation.report import evaluate_samples

    evaluate = shared["evaluate"]
    evaluate_samples(
        [out / "samples" / f"{name}.jsonl" for name in names],
        out_dir=out / "report",
        relaxer=evaluate.relaxer,
        data_dir=shared["run"].data_dir,
        train_limit=evaluate.train_limit,
        workers=evaluate.workers,
        relax_config=shared["relax"],
    )


def rescore_arms(out: Path, shared: dict, names: list[str]) -> None:
    from evaluation.relax import load_results
    from evaluation.rescore import rescore_relaxed

    relaxer = shared["evaluate"].relaxer
    relaxations = load_results(out / "report" / f"relax-{relaxer}.jsonl")
    wanted = {sid: r for sid, r in relaxations.items() if sid.split("/", 1)[0] in names}
    name = shared["reproduce"].rescore
    rescore_relaxed(wanted, out / "report" / f"rescore-{name}.jsonl", name, shared["run"].data_dir)


def write_report(out: Path, shared: dict, arms: dict[str, dict], names: list[str]) -> None:
    from pipeline.reproduce_report import reproduction_report

    report = reproduction_report(out, shared, arms, names)
    (out / "report" / "reproduction.md").write_text(report["markdown"])
    (out / "report" / "reproduction.json").write_text(json.dumps(report["json"], indent=2))
    console.print(report["markdown"], markup=False)

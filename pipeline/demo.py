"""`crystal-grpo demo`: small model -> SFT -> GRPO -> sample -> relax -> tables, resumable stage by stage.

Its settings are the preset configs/demo.toml (configs/demo-quick.toml with `--quick`), read by the same loader
as any `--config`; the resolved config lands in RUN/config.toml and a rerun with other settings is refused.
Finished stages are recorded in RUN/stages.json (atomically) and skipped on a rerun; SFT and GRPO resume from
their last checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from crystals.data import resolve_data_dir, split_formulas
from evaluation.relax import RelaxConfig
from grpo.atomic import atomic_write_text
from grpo.generation import GeneratorConfig
from grpo.sft import SFTConfig
from grpo.trainer import GRPOConfig
from pipeline.config import (
    EvaluateConfig,
    RewardConfig,
    RunConfig,
    SampleConfig,
    preset_path,
    refuse_changed_settings,
    save_resolved_config,
)
from pipeline.runs import (
    build_reward_fn,
    console,
    initial_model_source,
    run_grpo,
    run_sft,
    samples_summary,
    write_samples,
)
from pipeline.tables import stage_table

DEMO_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "sft": SFTConfig,
    "grpo": GRPOConfig,
    "reward": RewardConfig,
    "generator": GeneratorConfig,
    "sample": SampleConfig,
    "relax": RelaxConfig,
    "evaluate": EvaluateConfig,
}
DEMO_STAGES = ("model", "sft", "grpo", "sample", "evaluate")
ARMS = ("sft", "sft_rl")  # sampled and evaluated side by side


class StageLog:
    """Which demo stages are finished and how long each took, kept in RUN/stages.json (written atomically)."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, stage: str, covers: list[str] | None = None) -> bool:
        record = self.stages.get(stage, {})
        return record.get("done", False) and record.get("covers") == covers

    def finish(self, stage: str, seconds: float, covers: list[str] | None = None) -> None:
        # a stage redone over other `covers` adds its time to the earlier runs' (the work kept from them)
        earlier = self.stages.get(stage, {}).get("seconds", 0.0) if covers is not None else 0.0
        self.stages[stage] = {"done": True, "seconds": round(earlier + seconds, 1)}
        if covers is not None:
            self.stages[stage]["covers"] = covers
        atomic_write_text(self.path, json.dumps(self.stages, indent=2))

    def run(self, stage: str, work: Callable[[], object], covers: list[str] | None = None) -> None:
        """Do `work` unless the stage is finished (over the same `covers`: e.g. the arms an evaluation took in,
        so one over more arms runs again); record its time."""
        if self.done(stage, covers):
            console.print(
                f"[dim]stage {stage}: done earlier ({self.stages[stage]['seconds']} s), skipped[/dim]"
            )
            return
        console.rule(f"stage {stage}")
        start = time.perf_counter()
        work()
        self.finish(stage, time.perf_counter() - start, covers)


def demo_preset(quick: bool, config: Path | None = None) -> Path:
    """The demo's config file: `config` when given, else the demo preset or its quick variant."""
    return config if config is not None else preset_path("demo-quick" if quick else "demo")


def run_demo(out: Path, configs: dict) -> StageLog:
    """Run (or resume) every stage into `out`; returns the stage log."""
    run = configs["run"]
    data_path = resolve_data_dir(run.data_dir)
    reward_fn = build_reward_fn(configs["reward"], run.data_dir, run.max_atoms)
    refuse_changed_settings(out, configs, resume=True)
    save_resolved_config(out, configs)
    stages = StageLog(out / "stages.json")
    sft_dir, grpo_dir, samples_dir = out / "sft", out / "grpo", out / "samples"
    console.print(f"[bold]crystal-grpo demo[/bold] -> {escape(str(out))} (data: {escape(str(data_path))})")

    stages.run("model", lambda: initial_model_source(run, sft_dir))
    stages.run("sft", lambda: run_sft(run, configs["sft"], sft_dir))
    grpo_run = RunConfig(**{**vars(run), "model": str(sft_dir / "final_model")})
    stages.run("grpo", lambda: run_grpo(grpo_run, configs["grpo"], configs["generator"], reward_fn, grpo_dir))

    def sample_arms() -> None:
        sample = configs["sample"]
        formulas = split_formulas(sample.split, run.data_dir, seed=sample.seed, limit=sample.num_formulas)
        for arm, model_dir in zip(ARMS, (sft_dir, grpo_dir), strict=True):
            path = samples_dir / f"{arm}.jsonl"
            records = write_samples(
                run, model_dir / "final_model", sample, path, formulas, configs["generator"]
            )
            console.print(f"{arm}: {samples_summary(records, run.max_atoms)}")

    stages.run("sample", sample_arms)
    stages.run("evaluate", lambda: evaluate_arms(out, configs, data_path))
    return stages


def evaluate_arms(out: Path, configs: dict, data_path: Path) -> None:
    from evaluation.report import evaluate_samples

    evaluate = configs["evaluate"]
    evaluate_samples(
        [out / "samples" / f"{arm}.jsonl" for arm in ARMS],
        out_dir=out / "report",
        relaxer=evaluate.relaxer,
        data_dir=data_path,
        train_limit=evaluate.train_limit,
        workers=evaluate.workers,
        relax_config=configs["relax"],
        training_log=out / "grpo" / "train_log.jsonl",
    )


def verdicts(report: Path) -> list[str]:
    """SFT+RL against SFT, one line per metric (95 % bootstrap interval, paired by formula)."""
    from evaluation.compare import load_rows, verdict_lines

    sft, sft_rl = (load_rows(report, arm) for arm in ARMS)
    return verdict_lines(sft, sft_rl)


def print_demo_report(out: Path, stages: StageLog) -> None:
    report = out / "report"
    for name in ("table1.md", "table2.md", "extra.md"):
        if (report / name).exists():
            console.print((report / name).read_text(), markup=False)  # "[eV/atom]" is text, not a style
    console.print(stage_table(stages.stages, DEMO_STAGES))
    console.print(
        f"report: {report}  (metrics.json, table1.md, table2.md, plots, CIFs of metastable candidates)",
        markup=False,
    )
    if all((report / arm / "rows.jsonl").is_file() for arm in ARMS):
        lines = verdicts(report)
        (report / "verdicts.md").write_text("".join(f"- {line}\n" for line in lines))
        console.print("[bold]What RL changed[/bold] (sft_rl vs sft, 95 % bootstrap interval):")
        for line in lines:
            console.print(f"  {line}")

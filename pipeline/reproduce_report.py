"""The reproduction's report: every arm's metrics with 95 % bootstrap intervals (CHGNet relaxation and the
SevenNet re-score), each trained arm against its baseline, the reward-hack analysis (heavy atoms; E_tot and
E_hull over training), and what each stage cost. Numbers come from the run's own files only."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from evaluation.compare import METRICS, Metric, estimates, interval_table, load_rows, verdict_lines
from evaluation.jsonl import read_jsonl
from grpo.run_log import read_log
from pipeline.demo import StageLog

TRAINING_KEYS = (
    ("reward_mean", "reward"),
    ("info/energy_per_atom", "E_tot (eV/atom)"),
    ("info/e_above_hull", "E_hull (eV/atom)"),
    ("valid_fraction", "valid fraction"),
)


def _rescored(prefix: str, relaxed_only: bool, key: str) -> Metric:
    def value(row: dict) -> float:
        found = row.get(f"{prefix}_{key}")
        if found is None:
            return math.nan if relaxed_only or key == "e_hull" else 0.0
        return float(found)

    where = "relaxed" if relaxed_only else "all samples"
    if key == "e_hull":
        return Metric(f"{prefix} E_hull of the relaxed (eV/atom)", value, False, 1, 3)
    return Metric(f"{prefix} metastable rate, {where} (%)", value, True, 100, 1)


def _with_rescore(rows: list[dict], name: str, rescored: dict[str, dict], prefix: str) -> list[dict]:
    out = []
    for row in rows:
        record = rescored.get(f"{name}/{row['id']}", {})
        extra = {f"{prefix}_{k}": record[k] for k in ("e_hull", "metastable") if k in record}
        out.append({**row, **extra})
    return out


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _quarters(log: list[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last quarter of the logged steps."""
    values = [r[key] for r in log if isinstance(r.get(key), int | float)]
    if len(values) < 4:
        return math.nan, math.nan
    q = len(values) // 4
    return sum(values[:q]) / q, sum(values[-q:]) / q


def _training_table(out: Path, arms: dict[str, dict], names: list[str]) -> tuple[str, dict]:
    lines = [
        "| arm | steps | "
        + " | ".join(f"{label}: first -> last quarter" for _, label in TRAINING_KEYS)
        + " |",
        "|---" * (len(TRAINING_KEYS) + 2) + "|",
    ]
    result = {}
    for name in names:
        path = out / "arms" / name / "train_log.jsonl"
        if arms[name]["reproduce"].policy != "rl" or not path.is_file():
            continue
        log = read_log(path)
        result[name] = {key: _quarters(log, key) for key, _ in TRAINING_KEYS}
        cells = [f"{a:.3f} -> {b:.3f}" if math.isfinite(a) else "-" for a, b in result[name].values()]
        lines.append(f"| {name} | {len(log)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", result


def _heavy_table(report_dir: Path, names: list[str]) -> str:
    metrics = json.loads((report_dir / "metrics.json").read_text())["runs"]
    lines = ["| arm | heavy atoms, generated (%) | heavy atoms, prompts (%) |", "|---|---|---|"]
    for name in names:
        beyond = metrics[name]["beyond"]
        shares = [beyond[key] for key in ("heavy_fraction", "prompt_heavy_fraction")]
        lines.append(
            f"| {name} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in shares) + " |"
        )
    return "\n".join(lines) + "\n"


def reproduction_report(out: Path, shared: dict, arms: dict[str, dict], names: list[str]) -> dict:
    """{"markdown": str, "json": dict} for the arms in `names` (those with samples)."""
    report_dir = out / "report"
    resamples = shared["reproduce"].bootstrap
    prefix = shared["reproduce"].rescore
    metrics = list(METRICS)
    rows = {name: load_rows(report_dir, name) for name in names}
    if prefix:
        rescored = {r["id"]: r for r in read_jsonl(report_dir / f"rescore-{prefix}.jsonl")}
        rows = {name: _with_rescore(r, name, rescored, prefix) for name, r in rows.items()}
        metrics += [_rescored(prefix, False, "metastable"), _rescored(prefix, True, "metastable")]
        metrics.append(_rescored(prefix, True, "e_hull"))
    comparisons = {}
    verdicts = []
    for name in names:
        baseline = arms[name]["reproduce"].baseline
        if arms[name]["reproduce"].policy == "rl" and baseline in rows:
            lines = verdict_lines(rows[baseline], rows[name], metrics, resamples)
            comparisons[name] = {"baseline": baseline, "verdicts": lines}
            verdicts += [f"**{name} vs {baseline}**", *[f"  - {line}" for line in lines]]
    training, training_json = _training_table(out, arms, names)
    stages = StageLog(out / "stages.json").stages
    commit = _git_commit()
    run = shared["run"]
    markdown = "\n".join(
        [
            "# Reproduction: Tables 1 and 2 at CPU scale",
            "",
            f"Commit {commit or 'unknown'}; model {run.model}, data {run.data_dir or 'packaged subset'}; "
            f"relaxed with {shared['evaluate'].relaxer} (LBFGS + FrechetCellFilter, {shared['relax'].max_steps} "
            f"steps, fmax {shared['relax'].fmax}), E_hull on the MP-20 hull; re-scored by {prefix or 'nothing'}. "
            f"Each value: mean [95 % bootstrap interval, {resamples} resamples].",
            "",
            interval_table(rows, metrics, resamples),
            "## Trained arms against their baselines",
            "",
            *[line if line.startswith("  ") else f"- {line}" for line in verdicts],
            "",
            "## Reward hacking: heavy atoms (Z >= 37) in generated vs prompt compositions",
            "",
            _heavy_table(report_dir, names),
            "## Over training: E_tot and E_hull of the GRPO samples",
            "",
            training,
            "## Cost (seconds per stage)",
            "",
            "| stage | seconds |",
            "|---|---|",
            *[f"| {stage} | {info.get('seconds', '-')} |" for stage, info in stages.items()],
            "",
        ]
    )
    json_report = {
        "commit": commit,
        "arms": {name: estimates(r, metrics, resamples) for name, r in rows.items()},
        "comparisons": comparisons,
        "training": training_json,
        "stages": stages,
    }
    return {"markdown": markdown, "json": json_report}

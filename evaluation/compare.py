"""Arms side by side with 95 % bootstrap intervals, and a verdict per metric (evaluation.stats).

Works on the per-sample rows `evaluate_samples` writes (RUN/NAME/rows.jsonl). A metric is a per-sample value:
a 0/1 flag for a rate (over all samples, so an unparsed or failed sample counts as a 0 where the metric says
so) or a number for a mean (over the samples that have it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.jsonl import read_jsonl
from evaluation.metrics import METASTABLE_EV
from evaluation.stats import Comparison, Estimate, compare_means, compare_paired, mean_interval


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[dict], float]  # per-sample value; NaN: the sample does not count
    higher_is_better: bool
    scale: float = 1.0  # for display (100: a percentage)
    digits: int = 2


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _flag(row: dict, key: str) -> float:
    return 1.0 if row.get(key) is True else 0.0


def _metastable_if_relaxed(row: dict) -> float:
    e_hull = _number(row, "e_hull")
    return math.nan if math.isnan(e_hull) else float(e_hull < METASTABLE_EV)


METRICS: tuple[Metric, ...] = (
    Metric("metastable rate, all samples (%)", lambda r: _flag(r, "metastable"), True, 100, 1),
    Metric("metastable rate, relaxed (%)", _metastable_if_relaxed, True, 100, 1),
    Metric("E_hull after relaxation (eV/atom)", lambda r: _number(r, "e_hull"), False, 1, 3),
    Metric("E_hull before relaxation (eV/atom)", lambda r: _number(r, "e_hull_initial"), False, 1, 3),
    Metric("E_tot before relaxation (eV/atom)", lambda r: _number(r, "initial_energy_per_atom"), False, 1, 3),
    Metric("parse rate (%)", lambda r: _flag(r, "parsed"), True, 100, 1),
    Metric("valid structure, all samples (%)", lambda r: _flag(r, "valid_covalent"), True, 100, 1),
    Metric("exact formula, all samples (%)", lambda r: _flag(r, "exact_formula"), True, 100, 1),
)


def load_rows(report_dir: Path, name: str) -> list[dict]:
    return read_jsonl(Path(report_dir) / name / "rows.jsonl")


def values(rows: Sequence[dict], metric: Metric) -> list[float]:
    return [metric.value(row) for row in rows]


def _cell(estimate: Estimate, metric: Metric) -> str:
    if estimate.n == 0:
        return "-"
    s, d = metric.scale, metric.digits
    return f"{estimate.value * s:.{d}f} [{estimate.low * s:.{d}f}, {estimate.high * s:.{d}f}]"


def interval_table(
    arms: dict[str, Sequence[dict]], metrics: Sequence[Metric] = METRICS, resamples: int = 2000
) -> str:
    """Markdown: one row per arm, one column per metric, each `value [low, high]` (95 % bootstrap)."""
    lines = [
        "| arm | n | " + " | ".join(m.name for m in metrics) + " |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for name, rows in arms.items():
        cells = [_cell(mean_interval(values(rows, m), resamples), m) for m in metrics]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def estimates(rows: Sequence[dict], metrics: Sequence[Metric] = METRICS, resamples: int = 2000) -> dict:
    """{metric name: Estimate as a dict}, for metrics.json."""
    return {m.name: mean_interval(values(rows, m), resamples).as_dict() for m in metrics}


def compare(
    base_rows: Sequence[dict], rows: Sequence[dict], metric: Metric, resamples: int = 2000
) -> tuple[Comparison, str]:
    """The candidate `rows` against `base_rows` on one metric: paired by prompt formula when the two arms
    sampled the same formulas, else unpaired; returns the comparison and "paired" or "unpaired"."""
    base_keys = [row["prompt_formula"] for row in base_rows]
    keys = [row["prompt_formula"] for row in rows]
    if set(base_keys) == set(keys):
        result = compare_paired(
            values(base_rows, metric),
            base_keys,
            values(rows, metric),
            keys,
            metric.higher_is_better,
            resamples,
        )
        return result, "paired by formula"
    result = compare_means(
        values(base_rows, metric), values(rows, metric), metric.higher_is_better, resamples
    )
    return result, "unpaired"


def verdict_lines(
    base_rows: Sequence[dict],
    rows: Sequence[dict],
    metrics: Sequence[Metric] = METRICS,
    resamples: int = 2000,
) -> list[str]:
    """One line per metric: how the candidate `rows` compare with `base_rows` (better / worse / within noise,
    the difference and its 95 % interval)."""
    lines = []
    for metric in metrics:
        result, how = compare(base_rows, rows, metric, resamples)
        d, s, digits = result.difference, metric.scale, metric.digits
        detail = (
            f"{d.value * s:+.{digits}f} [{d.low * s:+.{digits}f}, {d.high * s:+.{digits}f}], {how}, n={d.n}"
            if d.n
            else "no data"
        )
        lines.append(f"{metric.name}: {result.verdict} ({detail})")
    return lines

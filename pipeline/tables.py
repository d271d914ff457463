"""The tables the commands print (rich renderables): data summaries, validity checks, rewards, stage times."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table


def data_summary_tables(summary: dict) -> list:
    """Rows per split, the elements covered and the atom-count histogram of `crystals.data.data_summary`."""
    splits = Table("split", "file", "rows")
    for split, info in summary["splits"].items():
        splits.add_row(split, Path(info["file"]).name, str(info["rows"]))
    histogram = Table("atoms per cell", "structures")
    for n_atoms, count in sorted(summary["nsites_histogram"].items(), key=lambda kv: int(kv[0])):
        histogram.add_row(str(n_atoms), str(count))
    elements = f"{summary['n_elements']} elements: {' '.join(summary['elements'])}"
    return [f"data directory: {escape(summary['data_dir'])}", splits, elements, histogram]


def validity_table(rows: list[tuple], max_atoms: int) -> Table:
    """One row per structure of `pipeline.runs.check_files`: green ok or the red reason of each check."""
    table = Table(
        "file", "formula", "atoms", "parse", "CDVAE 0.5 A", "covalent", "SMACT", f"<= {max_atoms} atoms"
    )
    for path, formula, n_atoms, checks in rows:
        cells = ["[green]ok[/green]" if c.ok else f"[red]{escape(c.reason)}[/red]" for c in checks]
        table.add_row(escape(str(path)), formula, str(n_atoms), "ok", *cells)
    return table


def reward_table(rows: list[tuple[str, str, float, str]]) -> Table:
    """(sample, formula, reward, penalty) rows of `pipeline.runs.score_files`."""
    table = Table("sample", "formula", "reward", "penalty")
    for name, formula, value, penalty in rows:
        table.add_row(escape(name), formula, f"{value:.4f}", escape(penalty))
    return table


def stage_table(stages: dict[str, dict], names: tuple[str, ...]) -> Table:
    """Seconds per pipeline stage ("-" for one not run)."""
    table = Table("stage", "seconds")
    for name in names:
        table.add_row(name, str(stages.get(name, {}).get("seconds", "-")))
    return table

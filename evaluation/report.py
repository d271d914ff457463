"""Samples JSONL -> relaxation -> metrics -> report files (``crystal-grpo evaluate``).

Input: one or more JSONL files, one generated sample per line: ``formula`` (the prompt's formula), ``text``
(the model's output in the bulk representation), optionally ``cif`` (used instead of ``text`` when
present) and ``id`` (default: the line number; ids key the relaxation results, so keep them stable).

Output in ``out_dir``:

- ``metrics.json``: settings and, per samples file, the summary of ``evaluation.metrics.compute_metrics``;
- ``table1.md``, ``table2.md``: the paper's Tables 1 and 2 with its rows and one row per samples file;
  ``extra.md``: the metrics the paper does not report;
- ``relax-<relaxer>.jsonl``: relaxation results of all files, keyed "<name>/<id>" (a re-run resumes from it);
- per samples file, in ``<name>/``: ``structures.csv`` (one row per sample), ``metastable/*.cif`` (relaxed structures with
  E_hull < 0.1 eV/atom), ``e_hull_hist.png``, ``e_hull_vs_elements.png``, ``metrics.json``;
- ``training_curves.png`` when a training log (JSONL with ``step`` and ``reward_mean``) is given.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crystals.hull import EnergyToHull
from crystals.sample import Sample, elements_of
from crystals.text import ParseError, read_cif, write_cif
from evaluation.jsonl import jsonable, read_jsonl
from evaluation.metrics import HULL_NAME, METASTABLE_EV, TrainingReference, compute_metrics
from evaluation.relax import RelaxConfig, default_workers, get_relaxer, relax_many, structure_from_record

MAX_ATOMS = 500  # parser limit for evaluation: raw outputs are judged as written (the RL penalty stops at 20)

# The paper's Table 1, as printed: model -> (E_hull mean ± std [eV/atom], metastability %, match %, RMSD [A]);
# UMA relaxation, Materials Project 2023 hull.
PAPER_TABLE1: dict[str, tuple[str, str, str, str]] = {
    "FlowMM": ("0.25 ± 0.94", "25.66", "46.78", "0.053"),
    "DiffCSP": ("0.22 ± 0.54", "30.84", "84.31", "0.028"),
    "Qwen2.5": ("3.43 ± 10.96", "5.03", "31.02", "0.052"),
    "Qwen2.5 SFT": ("0.37 ± 1.79", "26.5", "56.92", "0.044"),
    "Qwen2.5 RL (E_tot)": ("0.63 ± 0.49", "7.6", "84.40", "0.025"),
    "Qwen2.5 SFT+RL (E_tot)": ("0.35 ± 1.26", "27.29", "77.59", "0.037"),
}
# The paper's Table 2: validity (structure, composition), diversity (structure, composition), novelty
# (structure, composition); kept as printed (fractions, the paper's own precision).
PAPER_TABLE2: dict[str, tuple[str, str, str, str, str, str]] = {
    "FlowMM": ("0.99", "0.90", "0.78", "15.64", "0.71", "0.54"),
    "DiffCSP": ("0.99", "0.82", "0.89", "15.64", "0.81", "0.52"),
    "Qwen2.5": ("0.99", "0.85", "0.92", "15.66", "0.73", "0.49"),
    "Qwen2.5 SFT": ("1.00", "1.00", "0.912", "15.64", "0.56", "0.33"),
    "Qwen2.5 RL (E_tot)": ("1.00", "0.74", "1.2", "16.25", "0.40", "0.61"),
    "Qwen2.5 SFT+RL (E_tot)": ("1.00", "0.75", "0.97", "16.68", "0.57", "0.67"),
}

CSV_COLUMNS = (
    "id prompt_formula parsed parse_error formula n_atoms n_elements exact_formula element_set valid_covalent "
    "valid_cdvae valid_smact relax_ok relax_error relax_steps converged initial_energy_per_atom "
    "final_energy_per_atom e_form_per_atom e_hull e_hull_initial hull_error metastable stable match rmsd unique "
    "unique_relaxed novel_structure novel_composition sun sun_hull0 sun_new_composition structure_novelty "
    "composition_novelty heavy_fraction prompt_heavy_fraction mean_atomic_mass prompt_mean_atomic_mass"
).split()


def load_samples(path: str | Path, max_atoms: int = MAX_ATOMS) -> tuple[list[str], list[Sample]]:
    """(ids, parsed samples) of a samples JSONL file: the one reader of samples files, for ``evaluate`` and
    ``reward``. Raises ``ValueError`` naming the record for a line that is not an object, a ``formula`` that
    is missing or not a chemical formula, a ``text`` or ``cif`` that is not a string, and duplicate ids."""
    ids, samples = [], []
    for number, record in enumerate(read_jsonl(path), start=1):
        if "formula" not in record:
            raise ValueError(f"{path}: record {number} has no 'formula' (the prompt formula)")
        formula, text, cif = record["formula"], record.get("text"), record.get("cif")
        try:
            elements = elements_of(formula)
        except ValueError as err:
            raise ValueError(f"{path}: record {number}: {err}") from None
        for key, value in (("text", text), ("cif", cif)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: record {number}: {key} must be a string, got {str(value)[:40]!r}")
        text = text or ""
        ids.append(str(record.get("id", number)))
        # The raw text is what the model wrote and is judged as written; a CIF is read only when there is no
        # text (CIF cannot hold overlapping sites, so re-reading one would turn an overlap into a parse error).
        if cif and not text:
            try:
                structure = read_cif(cif if "\n" in cif else cif + "\n")  # text, never a file name
                sample = Sample(formula, elements, text, structure, None)
            except ParseError as e:
                sample = Sample(formula, elements, text, None, e.reason)
        else:
            sample = Sample.from_text(formula, text, max_atoms=max_atoms, elements=elements)
        samples.append(sample)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: sample ids are not unique")
    return ids, samples


def load_hull(
    data_dir: str | Path | None, energy_scale: str, cache_dir: str | Path | None = None
) -> tuple[EnergyToHull | None, str]:
    """(hull, note): the MP-20 hull for energies on ``energy_scale``, or None with the reason."""
    if energy_scale == "other":
        return None, (
            "no E_hull: this relaxer's energies are not on the Materials Project energy scale, so the MP-20 "
            "hull does not apply (UMA/OMat24 would need its own reference energies)"
        )
    try:
        return EnergyToHull.load(
            data_dir, cache_dir, apply_mp2020=energy_scale == "mp_uncorrected"
        ), HULL_NAME
    except FileNotFoundError as e:
        return None, f"no E_hull: {e}"


# ---------------------------------------------------------------------------------------------------------
# Tables


def _fmt(value, digits: int = 2, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def samples_constraint(path: str | Path) -> str:
    """The decoding constraint the samples were drawn under (their records' "constraint"; "none" when absent,
    "mixed" when they differ)."""
    found = {record.get("constraint", "none") for record in read_jsonl(path)}
    return found.pop() if len(found) == 1 else ("none" if not found else "mixed")


def row_label(name: str, summary: dict) -> str:
    """A table row's label: the run name, and the constraint its samples were drawn under when there was one."""
    constraint = summary.get("constraint", "none")
    return f"{name} (ours)" if constraint == "none" else f"{name} (ours, {constraint} constraint)"


def table1_markdown(runs: dict[str, dict], relaxer: str, hull_note: str) -> str:
    """The paper's Table 1 layout: its rows, then ours."""
    lines = [
        "# Table 1: stability after relaxation",
        "",
        "| Model | E_hull [eV/atom] ↓ | Metastability Rate (%) ↑ | Match Rate (%) ↑ | RMSD (Å) ↓ | Stable Rate (%) ↑ "
        "| Metastable, all samples (%) ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in PAPER_TABLE1.items():
        lines.append(f"| {name} (paper) | " + " | ".join(values) + " | - | - |")
    for name, summary in runs.items():
        t = summary["table1"]
        e_hull = f"{_fmt(t['e_hull_mean'])} ± {_fmt(t['e_hull_std'])}"
        cells = [
            e_hull,
            _fmt(t["metastable_rate"], 2, 100),
            _fmt(t["match_rate"], 2, 100),
            _fmt(t["rmsd"], 3),
            _fmt(t["stable_rate"], 2, 100),
            _fmt(t["metastable_rate_of_samples"], 2, 100),
        ]
        lines.append(f"| {row_label(name, summary)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paper rows: relaxed with UMA-s-1p1, E_hull against the Materials Project 2023 hull (copied from the "
        "paper).",
        f"Our rows: relaxed with {relaxer} (LBFGS + FrechetCellFilter); E_hull: {hull_note}. Metastable: E_hull "
        f"< {METASTABLE_EV} eV/atom; stable: E_hull <= 0; rates over the relaxed structures with an E_hull, and "
        "the metastable share of all samples (unparsed, rejected or failed ones count as not metastable); "
        "match rate and RMSD (normalised by (V/N)^(1/3)) from pymatgen StructureMatcher defaults, generated vs "
        "relaxed.",
    ]
    return "\n".join(lines) + "\n"


def table2_markdown(runs: dict[str, dict]) -> str:
    """The paper's Table 2 layout: its rows, then ours."""
    lines = [
        "# Table 2: validity, diversity and novelty (raw outputs)",
        "",
        "| Method | Validity Structure ↑ | Validity Composition ↑ | Diversity Structure ↑ | Diversity Composition ↑ "
        "| Novelty Structure ↑ | Novelty Composition ↑ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in PAPER_TABLE2.items():
        lines.append(f"| {name} (paper) | " + " | ".join(values) + " |")
    for name, summary in runs.items():
        t = summary["table2"]
        cells = [
            _fmt(t["validity_structure"]),
            _fmt(t["validity_composition"]),
            _fmt(t["diversity_structure"], 3),
            _fmt(t["diversity_composition"]),
            _fmt(t["novelty_structure"]),
            _fmt(t["novelty_composition"]),
        ]
        lines.append(f"| {row_label(name, summary)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Validity: structure = all distances d_ij > 0.5 (r_cov,i + r_cov,j) (the paper's rule; the CDVAE 0.5 Å "
        "rule is in metrics.json), composition = SMACT charge neutrality, both over parsed structures. "
        "Diversity: mean pairwise distance; novelty: mean distance to the nearest training structure. "
        "Structure space: CrystalNN site fingerprints averaged per structure; composition space: Magpie "
        "element properties standardised with the training set's mean and std.",
    ]
    return "\n".join(lines) + "\n"


EXTRA_COLUMNS = (
    ("parse_rate", "Parse rate (%)", 100, 1),
    ("e_hull_initial_median", "Median E_hull before relaxation [eV/atom]", 1, 3),
    ("exact_formula_rate", "Exact formula (%)", 100, 1),
    ("element_set_rate", "Element set (%)", 100, 1),
    ("uniqueness", "Unique (%)", 100, 1),
    ("novel_structure_rate", "Novel structure (%)", 100, 1),
    ("novel_composition_rate", "Novel composition (%)", 100, 1),
    ("sun_rate", "S.U.N. (%)", 100, 2),
    ("sun_rate_hull0", "S.U.N., E_hull<=0 (%)", 100, 2),
    ("heavy_fraction", "Heavy atoms (%)", 100, 1),
    ("prompt_heavy_fraction", "Heavy atoms, prompts (%)", 100, 1),
)


def extra_markdown(runs: dict[str, dict]) -> str:
    header = " | ".join(label for _, label, _, _ in EXTRA_COLUMNS)
    lines = ["# Beyond the paper", "", f"| Samples | {header} |", "|---" * (len(EXTRA_COLUMNS) + 1) + "|"]
    for name, summary in runs.items():
        values = {
            "parse_rate": summary["parse_rate"],
            "e_hull_initial_median": summary["table1"]["e_hull_initial_median"],
            **summary["beyond"],
        }
        cells = " | ".join(_fmt(values[key], digits, scale) for key, _, scale, digits in EXTRA_COLUMNS)
        lines.append(f"| {name} | {cells} |")
    lines += [
        "",
        "Rates over parsed samples, except S.U.N. (over all samples; stable = E_hull < 0.1 eV/atom as MatterGen, "
        "or <= 0; unique among the relaxed structures; novel = no training structure matches) and novel "
        "structure (over relaxed structures). Heavy atoms: Z >= 37, mean share per structure, next to the same "
        "share in the prompt formulas (a gap exposes the E_tot reward hack).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_e_hull(rows: list[dict], name: str, out_dir: Path) -> list[Path]:
    """E_hull histogram (clipped to [-0.5, 2] eV/atom, outliers in the edge bins) and E_hull by number of
    elements; nothing when no structure has an E_hull."""
    pairs = [
        (r["e_hull"], r["n_elements"])
        for r in rows
        if r.get("e_hull") is not None and math.isfinite(r["e_hull"])
    ]
    if not pairs:
        return []
    plt = _pyplot()
    e_hull = np.array([e for e, _ in pairs])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.clip(e_hull, -0.5, 2.0), bins=50, range=(-0.5, 2.0), color="tab:blue")
    ax.axvline(0.0, color="k", lw=1, label="hull")
    ax.axvline(METASTABLE_EV, color="tab:red", ls="--", lw=1, label=f"metastable < {METASTABLE_EV}")
    ax.set(
        xlabel="E_hull [eV/atom] (clipped to [-0.5, 2])",
        ylabel="structures",
        title=f"{name}: E_hull, MP-20 hull",
    )
    ax.legend()
    fig.tight_layout()
    hist = out_dir / "e_hull_hist.png"
    fig.savefig(hist, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = sorted({k for _, k in pairs})
    groups = [np.clip([e for e, k in pairs if k == c], -0.5, 2.0) for c in counts]
    ax.boxplot(groups, positions=counts, widths=0.6)
    ax.axhline(METASTABLE_EV, color="tab:red", ls="--", lw=1)
    ax.set(
        xlabel="number of elements",
        ylabel="E_hull [eV/atom] (clipped)",
        title=f"{name}: E_hull vs composition size",
    )
    fig.tight_layout()
    by_size = out_dir / "e_hull_vs_elements.png"
    fig.savefig(by_size, dpi=120)
    plt.close(fig)
    return [hist, by_size]


def plot_training_log(log_path: str | Path, out_path: Path) -> Path | None:
    """reward_mean over steps, plus metastability/validity curves when the log has them."""
    records = [r for r in read_jsonl(log_path) if "step" in r]
    keys = [
        k
        for k in ("reward_mean", "metastable_rate", "valid_fraction")
        if any(r.get(k) is not None for r in records)
    ]
    if "reward_mean" not in keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
        ax.set_ylabel(key)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


# ---------------------------------------------------------------------------------------------------------
# Files


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:80]


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Distinct names for the samples files: the file stem, prefixed by its folder when stems repeat."""
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [_safe_name(n) if names.count(n) == 1 else f"{_safe_name(n)}_{i}" for i, n in enumerate(names)]


def write_rows_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in jsonable(row).items()})


def write_metastable_cifs(rows: list[dict], relaxations: dict[str, dict], out_dir: Path) -> int:
    """Relaxed structures with E_hull < 0.1 eV/atom as CIFs named id_formula_ehull; returns the count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for row in rows:
        if not row.get("metastable"):
            continue
        structure = structure_from_record(relaxations[row["id"]])
        name = _safe_name(f"{row['id']}_{row['formula']}_ehull{row['e_hull']:.3f}")
        (out_dir / f"{name}.cif").write_text(write_cif(structure))
        count += 1
    return count


def _mean_wall(records) -> float:
    """Mean relaxation wall time of the structures that were relaxed (not rejected or failed)."""
    walls = [r["wall_s"] for r in records if r["ok"]]
    return float(np.mean(walls)) if walls else math.nan


def evaluate_samples(
    samples_paths: Sequence[str | Path],
    *,
    out_dir: str | Path,
    relaxer: str = "chgnet",
    relaxer_options: dict | None = None,
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    workers: int | None = None,
    relax_config: RelaxConfig | None = None,
    training_log: str | Path | None = None,
    cache_dir: str | Path | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict:
    """Relax, measure and report every samples file; returns what ``metrics.json`` holds.

    ``data_dir``: the data directory (holding mp20/ and hull/, as ``crystals.data.resolve_data_dir``); its
    train split is the novelty reference and its hull files give E_hull (without them the report says so
    and leaves E_hull out). ``train_limit``: use only the first rows of the train split (tests).
    ``workers``: processes for relaxation and fingerprints (default one per core; 0 = in this process).
    ``cache_dir``: where the hull and the training fingerprints are cached (default ~/.cache/crystal-grpo).
    Re-running with the same ``out_dir`` resumes the relaxations (failed ones are retried only with
    ``retry_failed``, e.g. after raising ``relax_config.timeout_s``).
    """
    relax_config = relax_config or RelaxConfig()
    out_dir = Path(out_dir)
    paths = [Path(p) for p in samples_paths]
    workers = default_workers() if workers is None else workers
    # the cheap checks first (bad samples, an unknown relaxer), before any folder is made or data read
    names = _run_names(paths)
    loaded = {name: load_samples(path) for name, path in zip(names, paths, strict=True)}
    energy_scale = get_relaxer(relaxer).energy_scale
    out_dir.mkdir(parents=True, exist_ok=True)
    hull, hull_note = load_hull(data_dir, energy_scale, cache_dir)
    train = TrainingReference(data_dir, train_limit, cache_dir, workers=max(1, workers), progress=progress)
    # one pool for all files (one start-up, no idle workers between files); ids become "name/id"
    items = [
        (f"{name}/{sid}", sample.structure)
        for name, (ids, samples) in loaded.items()
        for sid, sample in zip(ids, samples, strict=True)
        if sample.structure is not None
    ]
    start = time.perf_counter()
    relaxations = relax_many(
        items,
        out_dir / f"relax-{relaxer}.jsonl",
        relaxer=relaxer,
        relaxer_options=relaxer_options,
        config=relax_config,
        workers=workers,
        retry_failed=retry_failed,
        progress=progress,
    )
    relax_wall = time.perf_counter() - start
    runs: dict[str, dict] = {}
    for (name, (ids, samples)), path in zip(loaded.items(), paths, strict=True):
        run_dir = out_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        by_id = {sid: relaxations[f"{name}/{sid}"] for sid in ids if f"{name}/{sid}" in relaxations}
        summary, rows = compute_metrics(
            ids, samples, by_id, hull=hull, train=train, workers=max(1, workers), progress=progress
        )
        summary["samples_file"] = str(path)
        summary["constraint"] = samples_constraint(path)
        summary["timings"]["relax_s_per_structure"] = _mean_wall(by_id.values())
        summary["n_metastable_cifs"] = write_metastable_cifs(rows, by_id, run_dir / "metastable")
        write_rows_csv(rows, run_dir / "structures.csv")
        (run_dir / "rows.jsonl").write_text("".join(json.dumps(jsonable(row)) + "\n" for row in rows))
        summary["plots"] = [str(p) for p in plot_e_hull(rows, name, run_dir)]
        (run_dir / "metrics.json").write_text(json.dumps(jsonable(summary), indent=2))
        runs[name] = summary
    result = {
        "relaxer": relaxer,
        "relaxer_options": relaxer_options or {},
        "relax_config": {
            "fmax": relax_config.fmax,
            "max_steps": relax_config.max_steps,
            "timeout_s": relax_config.timeout_s,
        },
        "hull": hull_note,
        "relax_wall_s": relax_wall,
        "train": train.describe(),
        "runs": runs,
    }
    if training_log is not None:
        plot = plot_training_log(training_log, out_dir / "training_curves.png")
        result["training_plot"] = str(plot) if plot else None
    (out_dir / "metrics.json").write_text(json.dumps(jsonable(result), indent=2))
    (out_dir / "table1.md").write_text(table1_markdown(runs, relaxer, hull_note))
    (out_dir / "table2.md").write_text(table2_markdown(runs))
    (out_dir / "extra.md").write_text(extra_markdown(runs))
    return result

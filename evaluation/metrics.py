"""The paper's Table 1 and Table 2 metrics, and a few it does not report, for one set of generated samples.

Table 1 (stability, after relaxation; section 5.2). For every relaxed structure, with the relaxer's final
energy E (eV/atom) put on the MP-20 hull by ``crystals.hull.EnergyToHull``:

    E_hull = E_f(relaxed) - E_f(hull at that composition),   E_f = formation energy per atom

- E_hull mean +- std over the relaxed structures that have one;
- metastability rate: share with E_hull < 0.1 eV/atom; stable rate: share with E_hull <= 0;
- the median E_hull of the generated structures before relaxation (their own energy on the same hull):
  how far raw outputs are from a minimum, which relaxation hides;
- match rate: share of relaxed structures that pymatgen's ``StructureMatcher()`` (default tolerances, as
  the paper) matches to the generated one; RMSD: mean ``get_rms_dist`` of the matched pairs (pymatgen
  normalises displacements by (V/N)^(1/3)).

HULL: the numbers use the MP-20 formation-energy hull (all 45,229 MP-20 phases), not the Materials Project
2023 hull of the paper. It only holds phases with <= 20 atoms and E_hull < 0.08, so it is more lenient for
novel compositions (a missing competing phase makes E_hull too low); see data/hull/README.md.

Table 2 (raw outputs, no relaxation; section 5.3), over the parsed structures:

- structural validity: the paper's rule d_ij > 0.5 (r_cov,i + r_cov,j), and CDVAE's d_ij >= 0.5 A;
  compositional validity: CDVAE's SMACT charge-neutrality test (``crystals.validity``);
- diversity: mean pairwise Euclidean distance between the samples' fingerprints,
  (2 / (n (n-1))) sum_{i<j} |x_i - x_j|; novelty: mean distance to the nearest training fingerprint,
  (1/n) sum_i min_t |x_i - t|;
- fingerprints, as CDVAE: structural = matminer ``CrystalNNFingerprint`` ("ops" preset, 61 numbers per
  site) averaged over sites, for structures passing the CDVAE distance rule; compositional = matminer
  Magpie ``ElementProperty`` (132 numbers), standardised feature-wise with the training set's mean and
  standard deviation (CDVAE scales it the same way with fixed constants; with unit-variance features the
  typical distance is sqrt(2 * 132) = 16.2, the scale of the paper's 15.6-16.7).

Beyond the paper:

- parse rate (and the parser's reasons), formula adherence: share whose reduced formula equals the prompt's,
  and share with the prompt's element set;
- uniqueness: classes of ``StructureMatcher``-equivalent generated structures / parsed structures;
- S.U.N. rate (MatterGen): share of all samples whose relaxed structure is stable (E_hull < 0.1 eV/atom,
  MatterGen's threshold; ``sun_rate_hull0`` uses E_hull <= 0), unique (the first of its class among the
  relaxed structures) and novel (no training structure of the same reduced formula matches it,
  ``crystals.matching.KnownStructures``). ``sun_rate_new_composition`` asks for a reduced formula absent
  from the training set instead, which also covers training rows without a stored structure;
- heavy-atom fraction: mean share of a structure's atoms with Z >= 37 (period 5 and beyond), next to the
  same share in the prompt formulas and the mean atomic mass of both. The paper's E_tot reward can be
  gamed by heavier elements (lower total energy per atom, not lower E_hull); this exposes it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure

from crystals.data import load_split_frame, resolve_data_dir, split_path
from crystals.guard import GuardConfig, guard_structure
from crystals.hull import META_FILE, EnergyToHull, default_cache_dir, file_sha256
from crystals.matching import KnownStructures
from crystals.sample import Sample
from crystals.validity import (
    check_composition_smact,
    check_species,
    check_structure_cdvae,
    check_structure_covalent,
)
from evaluation.relax import limit_threads, structure_from_record

METASTABLE_EV = 0.1  # eV/atom, the paper's metastability threshold (and MatterGen's S.U.N. "stable")
STABLE_EV = 0.0
HEAVY_Z = 37  # Rb, first element of period 5
HULL_NAME = "MP-20 hull (formation energies of all 45,229 MP-20 phases; the paper used the MP 2023 hull)"
_DISTANCE_BLOCK = 1 << 22  # floats per distance block (32 MB): bounds memory for 27k training rows
_PARALLEL_MIN = 64  # featurise in worker processes only from this many items (spawning costs seconds)


# ---------------------------------------------------------------------------------------------------------
# Fingerprints


@functools.cache
def _crystalnn():
    from matminer.featurizers.site import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops")


@functools.cache
def _magpie():
    from matminer.featurizers.composition import ElementProperty

    return ElementProperty.from_preset("magpie")  # impute_nan=True: no NaN for elements with gaps


def structure_fingerprint(structure: Structure) -> np.ndarray:
    """CDVAE's structural fingerprint: the CrystalNN "ops" site fingerprint averaged over sites (61,)."""
    featurizer = _crystalnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CrystalNN warns about missing oxidation states on every call
        return np.mean([featurizer.featurize(structure, i) for i in range(len(structure))], axis=0)


def composition_fingerprint(composition: Composition) -> np.ndarray:
    """Magpie element-property statistics of a composition (132,)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(_magpie().featurize(Composition(composition)), dtype=float)


# name -> (function, number of features, identifier for caches: changes when the features would)
FINGERPRINTS: dict[str, tuple[Callable, int, str]] = {
    "structure": (structure_fingerprint, 61, "crystalnn-ops-sitemean"),
    "composition": (composition_fingerprint, 132, "magpie-elementproperty"),
}


def _fingerprint_or_nan(kind: str, item) -> np.ndarray:
    function, dim, _ = FINGERPRINTS[kind]
    try:
        x = np.asarray(function(item), dtype=float)
        return x if x.shape == (dim,) else np.full(dim, np.nan)
    except Exception:  # a structure CrystalNN cannot handle gets a NaN row, counted by the caller
        return np.full(dim, np.nan)


def _quiet_single_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # one process per core; BLAS threads would only spin (see evaluation.relax)
    warnings.simplefilter("ignore")


def fingerprints(kind: str, items: Sequence, workers: int = 1, progress: bool = False) -> np.ndarray:
    """(n, d) fingerprints of ``kind`` ("structure" or "composition"); a failed item is a row of NaN.
    With ``workers`` > 1 and enough items the work is spread over spawned processes."""
    from rich.progress import Progress

    _, dim, _ = FINGERPRINTS[kind]
    out = np.full((len(items), dim), np.nan)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{kind} fingerprints", total=len(items))
        if workers > 1 and len(items) >= _PARALLEL_MIN:
            context = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_single_thread) as pool:
                chunk = max(1, min(64, len(items) // (4 * workers)))
                rows = pool.map(_fingerprint_or_nan, [kind] * len(items), items, chunksize=chunk)
                for i, row in enumerate(rows):
                    out[i] = row
                    bar.advance(task)
        else:
            with limit_threads(1):
                for i, item in enumerate(items):
                    out[i] = _fingerprint_or_nan(kind, item)
                    bar.advance(task)
    return out


# ---------------------------------------------------------------------------------------------------------
# Distances (vectorised, in blocks)


def _distance_blocks(queries: np.ndarray, reference: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, |q_i - r_j| for a block of query rows), with |q - r|^2 = |q|^2 + |r|^2 - 2 q.r as one
    matrix product per block; blocks keep rows x len(reference) under _DISTANCE_BLOCK floats."""
    q = np.asarray(queries, dtype=float)
    r = np.asarray(reference, dtype=float)
    r2 = np.einsum("ij,ij->i", r, r)
    rows = max(1, _DISTANCE_BLOCK // max(1, len(r)))
    for lo in range(0, len(q), rows):
        block = q[lo : lo + rows]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] + r2[None, :] - 2.0 * block @ r.T
        yield lo, np.sqrt(np.maximum(d2, 0.0))  # rounding can make d2 slightly negative


def nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """min_j |q_i - r_j| for every query row (reference rows must be finite)."""
    out = np.empty(len(queries))
    for lo, d in _distance_blocks(queries, reference):
        out[lo : lo + len(d)] = d.min(axis=1)
    return out


def mean_pairwise_distance(x: np.ndarray) -> float:
    """(2 / (n (n-1))) sum_{i<j} |x_i - x_j|; NaN for fewer than two rows."""
    n = len(x)
    if n < 2:
        return math.nan
    total = sum(float(d.sum()) for _, d in _distance_blocks(x, x))  # every pair twice, diagonal ~0
    return total / (n * (n - 1))


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


# ---------------------------------------------------------------------------------------------------------
# Training reference


def _cached_array(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()`` once, then from ``path`` (.npy; written atomically so concurrent runs never read half)."""
    if path.is_file():
        return np.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{time.time_ns()}.npy")
    np.save(tmp, value)
    tmp.replace(path)
    return value


class TrainingReference:
    """The training split as the reference for novelty: fingerprints (cached on disk), reduced formulas, and
    structures per formula for ``StructureMatcher`` novelty.

    ``limit`` takes the first rows of the train split only (for tests; numbers then mean little). Without
    it, the compositions come from mp20_all_splits_meta.csv.gz when present: it lists all 27,136 MP-20
    training rows, including the 7,197 whose structure is missing from the shared copy, so compositional
    novelty uses the full training set while structural novelty uses the structures available.

    Fingerprints are cached under ``cache_dir``/features keyed by the source file's sha256, the fingerprint
    identifier and matminer's version, and the limit. Measured on a busy 2-core machine: CrystalNN ~0.5 s
    per structure and Magpie ~0.02 s per formula per process, i.e. about 3 h and 8 min of CPU time for the
    full training set.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        cache_dir: str | Path | None = None,
        workers: int = 1,
        progress: bool = True,
    ):
        self.data_dir = resolve_data_dir(data_dir)
        self.limit = limit
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.workers = workers
        self.progress = progress
        self.train_file = split_path("train", self.data_dir)
        frame = load_split_frame("train", self.data_dir)
        self.frame = frame if limit is None else frame.head(limit)
        meta = self.data_dir / META_FILE
        if limit is None and meta.is_file():
            import pandas as pd

            table = pd.read_csv(meta, usecols=["split", "reduced_formula"])
            self.formula_file = meta
            self.formulas = sorted(set(table.loc[table.split == "train", "reduced_formula"]))
        else:
            self.formula_file = self.train_file
            self.formulas = sorted(set(self.frame["reduced_formula"]))

    def describe(self) -> dict:
        return {
            "train_file": str(self.train_file),
            "limit": self.limit,
            "n_structures": len(self.frame),
            "formula_file": str(self.formula_file),
            "n_formulas": len(self.formulas),
        }

    def _cache_path(self, kind: str, source: Path) -> Path:
        _, _, name = FINGERPRINTS[kind]
        key = f"{file_sha256(source)[:16]}-{self.limit or 'all'}"
        return (
            self.cache_dir / "features" / f"{name}-matminer{importlib.metadata.version('matminer')}-{key}.npy"
        )

    @functools.cached_property
    def structure_fingerprints(self) -> np.ndarray:
        """Fingerprints of the training structures with finite values (rows of failed ones dropped)."""

        def compute() -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structures = [Structure.from_str(cif, fmt="cif") for cif in self.frame["cif"]]
            return fingerprints("structure", structures, self.workers, self.progress)

        x = _cached_array(self._cache_path("structure", self.train_file), compute)
        return x[_finite_rows(x)]

    @functools.cached_property
    def composition_fingerprints(self) -> np.ndarray:
        """Raw (unscaled) Magpie fingerprints of the distinct training formulas."""

        def compute() -> np.ndarray:
            return fingerprints("composition", self.formulas, self.workers, self.progress)

        x = _cached_array(self._cache_path("composition", self.formula_file), compute)
        return x[_finite_rows(x)]

    @functools.cached_property
    def composition_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature-wise mean and standard deviation of the training compositions (std 0 -> 1)."""
        x = self.composition_fingerprints
        std = x.std(axis=0)
        return x.mean(axis=0), np.where(std > 0, std, 1.0)

    def scale_compositions(self, x: np.ndarray) -> np.ndarray:
        mean, std = self.composition_scale
        return (x - mean) / std

    @functools.cached_property
    def novelty(self) -> KnownStructures:
        """StructureMatcher novelty against the training structures of the same reduced formula."""
        if self.limit is None:
            return KnownStructures(data_dir=self.data_dir)  # parses a formula's CIFs when first asked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return KnownStructures([Structure.from_str(cif, fmt="cif") for cif in self.frame["cif"]])

    def novel_structures(self, structures: Sequence[Structure]) -> list[bool]:
        return [self.novelty.is_novel(s) for s in structures]


# ---------------------------------------------------------------------------------------------------------
# Per-sample quantities


def _first_of_class(structures: Sequence[Structure]) -> list[bool]:
    """True for the first structure of each StructureMatcher equivalence class (pymatgen groups by
    composition, then matches within a group)."""
    index = {id(s): i for i, s in enumerate(structures)}
    first = [False] * len(structures)
    for group in StructureMatcher().group_structures(list(structures)):
        first[min(index[id(s)] for s in group)] = True
    return first


def _match(generated: Structure, relaxed: Structure) -> tuple[bool, float]:
    """(StructureMatcher().fit, normalised RMS displacement when matched else NaN)."""
    matcher = StructureMatcher()
    try:
        if not matcher.fit(generated, relaxed):
            return False, math.nan
        rms = matcher.get_rms_dist(generated, relaxed)
    except Exception:  # pymatgen's lattice search can fail on degenerate cells: no match
        return False, math.nan
    return True, (math.nan if rms is None else float(rms[0]))


def _heavy_fraction(composition: Composition) -> float:
    return sum(n for el, n in composition.items() if el.Z >= HEAVY_Z) / composition.num_atoms


def _mean_mass(composition: Composition) -> float:
    return float(composition.weight) / composition.num_atoms


def _safe_check(check: Callable, *args) -> bool:
    try:
        return bool(check(*args))
    except ValueError:  # e.g. SMACT on a fractional composition
        return False


def _rate(flags, denominator: int) -> float:
    return sum(bool(f) for f in flags) / denominator if denominator else math.nan


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _median(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(values)) if values else math.nan


def _std(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.std(values)) if values else math.nan


def _raw_row(sid: str, sample: Sample) -> dict:
    """What the raw output alone says: parse, validity, formula adherence, heavy atoms."""
    s = sample.structure
    row = {
        "id": sid,
        "prompt_formula": sample.formula,
        "parsed": s is not None,
        "parse_error": sample.parse_error,
    }
    if s is None:
        return row
    prompt = Composition(sample.formula)
    return row | {
        "formula": s.composition.reduced_formula,
        "n_atoms": len(s),
        "n_elements": len(s.composition.elements),
        "exact_formula": s.composition.reduced_formula == prompt.reduced_formula,
        "element_set": check_species(s, sample.elements).ok,
        "valid_covalent": check_structure_covalent(s).ok,
        "valid_cdvae": check_structure_cdvae(s).ok,
        "valid_smact": _safe_check(check_composition_smact, s.composition),
        "heavy_fraction": _heavy_fraction(s.composition),
        "prompt_heavy_fraction": _heavy_fraction(prompt),
        "mean_atomic_mass": _mean_mass(s.composition),
        "prompt_mean_atomic_mass": _mean_mass(prompt),
    }


def _relaxed_fields(generated: Structure, record: dict, hull: EnergyToHull | None) -> dict:
    """Relaxation outcome, match to the generated cell, and E_hull before and after relaxation."""
    fields = {
        "relax_ok": record["ok"],
        "relax_error": record.get("error"),
        "relax_steps": record.get("steps"),
    }
    if not record["ok"]:
        return fields
    final = structure_from_record(record)
    fields |= {
        "converged": record["converged"],
        "initial_energy_per_atom": record["initial_energy_per_atom"],
        "final_energy_per_atom": record["final_energy_per_atom"],
    }
    fields["match"], fields["rmsd"] = _match(generated, final)
    if hull is not None:
        try:
            fields["e_hull"], fields["e_form_per_atom"] = hull(final, record["final_energy_per_atom"])
            fields["e_hull_initial"], _ = hull(generated, record["initial_energy_per_atom"])
        except Exception as e:  # HullError (element outside MP-20), MP2020 compatibility rejections
            fields["hull_error"] = f"{type(e).__name__}: {e}"[:200]
    return fields


def _fingerprint_distances(
    rows: list[dict],
    samples: Sequence[Sample],
    parsed: list[int],
    train: TrainingReference | None,
    workers: int,
    progress: bool,
) -> dict:
    """Table 2's diversity and novelty; per-row nearest-training distances go into ``rows``. Structural
    fingerprints only for CDVAE-valid cells the neighbour search can handle (CrystalNN on overlapping atoms
    is meaningless); compositions standardised with the training statistics (so without ``train``, no
    compositional numbers)."""
    guard = GuardConfig(timeout_s=None)
    index = {
        "structure": [
            i
            for i in parsed
            if rows[i]["valid_cdvae"] and guard_structure(samples[i].structure, guard) is None
        ],
        "composition": parsed,
    }
    items = {
        "structure": [samples[i].structure for i in index["structure"]],
        "composition": [samples[i].structure.composition for i in index["composition"]],
    }
    out: dict = {}
    for kind in ("structure", "composition"):
        start = time.perf_counter()
        x = fingerprints(kind, items[kind], workers, progress)
        out[f"{kind}_fingerprint_s_per_item"] = (time.perf_counter() - start) / max(1, len(x))
        ok = _finite_rows(x)
        x, kept = x[ok], [i for i, good in zip(index[kind], ok, strict=True) if good]
        out[f"n_{kind}_fingerprints"] = len(x)
        out[f"diversity_{kind}"] = out[f"novelty_{kind}"] = math.nan
        if kind == "composition":
            if train is None:
                continue  # the scale comes from the training set
            x = train.scale_compositions(x)
        out[f"diversity_{kind}"] = mean_pairwise_distance(x)
        if train is None or not len(x):
            continue
        if kind == "structure":
            reference = train.structure_fingerprints
        else:
            reference = train.scale_compositions(train.composition_fingerprints)
        nearest = nearest_distances(x, reference)
        for i, d in zip(kept, nearest, strict=True):
            rows[i][f"{kind}_novelty"] = float(d)
        out[f"novelty_{kind}"] = float(nearest.mean())
    return out


def compute_metrics(
    ids: Sequence[str],
    samples: Sequence[Sample],
    relaxations: dict[str, dict],
    *,
    hull: EnergyToHull | None,
    train: TrainingReference | None,
    workers: int = 1,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """(summary, one row per sample) for generated ``samples`` (ids parallel to them) with their
    relaxation records by id (``evaluation.relax``). ``hull`` None: no E_hull (Table 1 keeps match rate
    and RMSD); ``train`` None: no novelty; either None: no S.U.N."""
    rows = [_raw_row(sid, sample) for sid, sample in zip(ids, samples, strict=True)]
    parsed = [i for i, sample in enumerate(samples) if sample.structure is not None]
    start = time.perf_counter()
    relaxed: dict[int, Structure] = {}
    for i in parsed:
        record = relaxations.get(rows[i]["id"])
        if record is not None:
            rows[i] |= _relaxed_fields(samples[i].structure, record, hull)
            if record["ok"]:
                relaxed[i] = structure_from_record(record)
    timings = {"match_and_hull_s": time.perf_counter() - start}

    # uniqueness of the raw outputs; S.U.N. on the relaxed structures (MatterGen)
    for i, first in zip(parsed, _first_of_class([samples[i].structure for i in parsed]), strict=True):
        rows[i]["unique"] = first
    order = sorted(relaxed)
    for i, first in zip(order, _first_of_class([relaxed[i] for i in order]), strict=True):
        rows[i]["unique_relaxed"] = first
    if train is not None:
        start = time.perf_counter()
        for i, novel in zip(order, train.novel_structures([relaxed[i] for i in order]), strict=True):
            rows[i]["novel_structure"] = novel
        known = set(train.formulas)
        for i in parsed:
            rows[i]["novel_composition"] = rows[i]["formula"] not in known
        timings["structure_matcher_novelty_s"] = time.perf_counter() - start
    for row in rows:
        e_hull = row.get("e_hull")
        has = e_hull is not None and math.isfinite(e_hull)
        row["metastable"] = has and e_hull < METASTABLE_EV
        row["stable"] = has and e_hull <= STABLE_EV
        unique = row.get("unique_relaxed", False)
        row["sun"] = row["metastable"] and unique and row.get("novel_structure", False)
        row["sun_hull0"] = row["stable"] and unique and row.get("novel_structure", False)
        row["sun_new_composition"] = row["metastable"] and unique and row.get("novel_composition", False)

    table2 = _fingerprint_distances(rows, samples, parsed, train, workers, progress)
    for kind in ("structure", "composition"):
        timings[f"{kind}_fingerprint_s_per_item"] = table2.pop(f"{kind}_fingerprint_s_per_item")
    summary = _summary(rows, parsed, order, table2, with_hull=hull is not None, with_train=train is not None)
    summary["timings"] = timings
    if train is not None:
        summary["train"] = train.describe()
    return summary, rows


def _summary(
    rows: list[dict], parsed: list[int], relaxed: list[int], table2: dict, with_hull: bool, with_train: bool
) -> dict:
    """Rates and means over the per-sample rows (denominators in the module docstring)."""
    n, n_parsed = len(rows), len(parsed)
    p_rows, r_rows = [rows[i] for i in parsed], [rows[i] for i in relaxed]
    e_hulls = [r["e_hull"] for r in r_rows if r.get("e_hull") is not None and math.isfinite(r["e_hull"])]
    attempted = [r for r in p_rows if "relax_ok" in r]
    sun = with_hull and with_train

    def rate(key: str, over: list[dict], denominator: int | None = None, when: bool = True) -> float:
        return (
            _rate((r.get(key) for r in over), len(over) if denominator is None else denominator)
            if when
            else math.nan
        )

    return {
        "n_samples": n,
        "n_parsed": n_parsed,
        "parse_rate": n_parsed / n if n else math.nan,
        "parse_errors": dict(Counter(r["parse_error"] for r in rows if r["parse_error"])),
        "table1": {
            "hull": HULL_NAME if with_hull else None,
            "n_relax_attempted": len(attempted),
            "n_relaxed": len(r_rows),
            "relax_errors": dict(
                Counter(_error_kind(r["relax_error"]) for r in attempted if not r["relax_ok"])
            ),
            "converged_rate": rate("converged", r_rows),
            "n_e_hull": len(e_hulls),
            "hull_errors": sum("hull_error" in r for r in r_rows),
            "e_hull_mean": _mean(e_hulls),
            "e_hull_std": _std(e_hulls),
            "e_hull_median": _median(e_hulls),
            "e_hull_initial_median": _median([r.get("e_hull_initial") for r in r_rows]),
            "metastable_rate": _rate((e < METASTABLE_EV for e in e_hulls), len(e_hulls)),
            "stable_rate": _rate((e <= STABLE_EV for e in e_hulls), len(e_hulls)),
            "metastable_rate_of_samples": rate("metastable", rows),
            "match_rate": rate("match", r_rows),
            "rmsd": _mean([r["rmsd"] for r in r_rows if r["match"]]),
        },
        "table2": {
            "validity_structure": rate("valid_covalent", p_rows),
            "validity_structure_cdvae": rate("valid_cdvae", p_rows),
            "validity_composition": rate("valid_smact", p_rows),
            **table2,
        },
        "beyond": {
            "uniqueness": rate("unique", p_rows),
            "sun_rate": rate("sun", rows, when=sun),
            "sun_rate_hull0": rate("sun_hull0", rows, when=sun),
            "sun_rate_new_composition": rate("sun_new_composition", rows, when=sun),
            "novel_structure_rate": rate("novel_structure", r_rows, when=with_train),
            "novel_composition_rate": rate("novel_composition", p_rows, when=with_train),
            "exact_formula_rate": rate("exact_formula", p_rows),
            "element_set_rate": rate("element_set", p_rows),
            "heavy_fraction": _mean([r["heavy_fraction"] for r in p_rows]),
            "prompt_heavy_fraction": _mean([r["prompt_heavy_fraction"] for r in p_rows]),
            "mean_atomic_mass": _mean([r["mean_atomic_mass"] for r in p_rows]),
            "prompt_mean_atomic_mass": _mean([r["prompt_mean_atomic_mass"] for r in p_rows]),
        },
    }


def _error_kind(error: str | None) -> str:
    """The stable part of a failure message ("timeout", "rejected: huge_cell", "RuntimeError", ...)."""
    error = error or "unknown"
    if error.startswith("rejected:"):
        return error
    return error.split(":")[0]

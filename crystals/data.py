"""MP-20 splits (CDVAE's train/val/test csv.gz files with a ``cif`` column) and the prompt formulas drawn
from them.

Where the data comes from, first match wins: the ``data_dir`` argument (CLI option ``--data-dir``), the
environment variable ``CRYSTAL_GRPO_DATA``, the demo subset packaged in ``crystals/demo_data``. The directory
may be the one holding ``mp20/`` or ``mp20/`` itself; ``resolve_data_dir`` returns the one holding the split
files (so the hull data of a full data dir is at ``resolve_data_dir(d).parent / "hull"``).

Structures are parsed lazily, one CIF per yielded record (~4 ms each); metadata that only needs the cell
composition (reduced formula, atom count) comes from the CIF's ``_chemical_formula_sum`` line instead, which
pymatgen's CIF writer always emits and costs no structure parse.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pymatgen.core import Composition, Element, Structure

ENV_VAR = "CRYSTAL_GRPO_DATA"
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
SPLITS = ("train", "val", "test")
# train.csv.gz (complete) is preferred; the shared copy only has train_partial.csv.gz.
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.csv.gz", "train_partial.csv.gz"),
    "val": ("val.csv.gz",),
    "test": ("test.csv.gz",),
}
Split = Literal["train", "val", "test"]

# `_chemical_formula_sum   'Tm1 Mg1 Hg2'` (quoted when it has spaces, bare for one element: `Si2`).
_FORMULA_SUM = r"(?m)^_chemical_formula_sum[ \t]+'?([^'\n]+?)'?[ \t]*$"


class DataError(Exception):
    """The data directory or a split file is missing or unreadable (message says where and how to fix)."""


@dataclass(frozen=True)
class CrystalRecord:
    material_id: str
    formula: str  # reduced formula, e.g. "Fe2O3"
    structure: Structure


def _split_file_names() -> list[str]:
    return [name for names in SPLIT_FILES.values() for name in names]


def _has_split_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _split_file_names())


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The directory holding the MP-20 split files: option > $CRYSTAL_GRPO_DATA > packaged demo subset."""
    if data_dir is not None:
        root, source = Path(data_dir), "--data-dir"
    elif os.environ.get(ENV_VAR):
        root, source = Path(os.environ[ENV_VAR]), f"environment variable {ENV_VAR}"
    else:
        root, source = DEMO_DIR, "the packaged demo subset"
    root = root.expanduser()
    for candidate in (root / "mp20", root):
        if _has_split_files(candidate):
            return candidate
    if not root.exists():
        problem = "does not exist"
    elif not root.is_dir():
        problem = "is not a directory"
    else:
        problem = "holds no MP-20 split files"
    raise DataError(
        f"MP-20 data directory {root} (from {source}) {problem}: looked for "
        f"{', '.join(_split_file_names())} in {root / 'mp20'} and in {root}. Point at a data directory "
        f"(the one holding mp20/, or mp20/ itself) with the option --data-dir DIR or the environment "
        f"variable {ENV_VAR}=DIR."
    )


def split_path(split: Split, data_dir: str | Path | None = None) -> Path:
    """The csv.gz file of ``split`` ("train" reads train.csv.gz, else train_partial.csv.gz)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    directory = resolve_data_dir(data_dir)
    for name in SPLIT_FILES[split]:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"no {split} split in {directory}: expected {' or '.join(SPLIT_FILES[split])}")


def _read_split(split: Split, data_dir: str | Path | None, nrows: int | None = None) -> pd.DataFrame:
    path = split_path(split, data_dir)
    try:
        frame = pd.read_csv(path, nrows=nrows)
    except (OSError, ValueError) as e:  # bad gzip, empty or malformed csv
        raise DataError(f"cannot read {path}: {e}") from e
    if "cif" not in frame.columns:
        raise DataError(f"{path} has no 'cif' column (columns: {', '.join(map(str, frame.columns))})")
    return frame


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pymatgen's per-item warnings: it warns on nearly every MP-20 CIF that it snapped coordinates
    to ideal fractions, and on every noble gas that it has no Pauling electronegativity (formula ordering).
    Never yield a record inside this block: the filter is process-global and would leak to the caller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _parse_cif(cif: str) -> tuple[Structure, str]:
    """Structure of a CIF and its reduced formula."""
    with _quiet():
        structure = Structure.from_str(cif, fmt="cif")
        return structure, structure.composition.reduced_formula


def _cell_compositions(cifs: pd.Series) -> list[Composition]:
    """Cell composition of each CIF from its formula-sum line (parsed once per distinct line); a CIF
    without that line falls back to a full structure parse."""
    sums = cifs.str.extract(_FORMULA_SUM, expand=False)
    cache = {s: Composition(s) for s in sums.dropna().unique()}
    return [
        cache[s] if isinstance(s, str) else _parse_cif(cif)[0].composition
        for s, cif in zip(sums, cifs, strict=True)
    ]


def load_split_frame(split: Split, data_dir: str | Path | None = None) -> pd.DataFrame:
    """The split's table as stored, plus ``reduced_formula`` and ``nsites`` (atoms in the cell) computed
    without parsing structures: the fast route for metadata (formulas, counts, histograms)."""
    frame = _read_split(split, data_dir)
    compositions = _cell_compositions(frame["cif"])
    with _quiet():
        frame["reduced_formula"] = [c.reduced_formula for c in compositions]
    frame["nsites"] = [round(c.num_atoms) for c in compositions]
    return frame


def iter_split(
    split: Split, data_dir: str | Path | None = None, limit: int | None = None
) -> Iterator[CrystalRecord]:
    """Records of ``split`` in file order, the first ``limit`` rows only when given; one CIF parse per
    record, done as the iterator advances."""
    frame = _read_split(split, data_dir, nrows=limit)
    if "material_id" in frame.columns:
        ids = frame["material_id"].astype(str)
    else:  # a user's csv without ids: name rows by split and position
        ids = pd.Series([f"{split}-{i}" for i in range(len(frame))])
    for material_id, cif in zip(ids, frame["cif"], strict=True):
        structure, formula = _parse_cif(cif)
        yield CrystalRecord(material_id, formula, structure)


def split_formulas(
    split: Split,
    data_dir: str | Path | None = None,
    dedupe: bool = True,
    seed: int | None = 0,
    limit: int | None = None,
) -> list[str]:
    """Reduced formulas of ``split`` for prompts: duplicates dropped (first occurrence kept) when
    ``dedupe``, shuffled with ``random.Random(seed)`` (file order when seed is None), then the first
    ``limit``."""
    formulas = load_split_frame(split, data_dir)["reduced_formula"].tolist()
    if dedupe:
        formulas = list(dict.fromkeys(formulas))
    if seed is not None:
        random.Random(seed).shuffle(formulas)
    return formulas[:limit]


def data_summary(data_dir: str | Path | None = None) -> dict:
    """What ``crystal-grpo data info`` prints: rows per split present, the elements covered (ordered by
    atomic number) and the histogram of atoms per cell over all splits."""
    directory = resolve_data_dir(data_dir)
    splits: dict[str, dict] = {}
    nsites: Counter[int] = Counter()
    covered: set[Element] = set()
    for split in SPLITS:
        try:
            path = split_path(split, directory)
        except DataError:  # a data dir may hold only some of the splits
            continue
        # compositions only: reduced formulas (load_split_frame) would cost ~3x more and are not needed
        compositions = _cell_compositions(_read_split(split, directory)["cif"])
        splits[split] = {"file": path.name, "rows": len(compositions)}
        nsites.update(round(c.num_atoms) for c in compositions)
        covered.update(el for c in compositions for el in c.elements)
    elements = sorted(covered, key=lambda el: el.Z)
    return {
        "data_dir": str(directory),
        "splits": splits,
        "rows": sum(s["rows"] for s in splits.values()),
        "n_elements": len(elements),
        "elements": [el.symbol for el in elements],
        "nsites_histogram": dict(sorted(nsites.items())),
    }

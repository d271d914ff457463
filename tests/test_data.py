"""MP-20 loading: data-dir resolution, split reading on the shared data and on the packaged demo subset."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Composition, Element

from crystals.data import (
    DEMO_DIR,
    ENV_VAR,
    CrystalRecord,
    DataError,
    data_summary,
    iter_split,
    load_split_frame,
    resolve_data_dir,
    split_formulas,
    split_path,
)
from crystals.demo_data.build_demo_subset import ROWS, build


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A data dir laid out like the real one (root/mp20/<splits>), filled with the demo files."""
    shutil.copytree(DEMO_DIR, tmp_path / "mp20", ignore=shutil.ignore_patterns("*.py", "*.md"))
    return tmp_path


# --- resolution -------------------------------------------------------------------------------------------


def test_default_is_packaged_demo(no_env, monkeypatch):
    assert resolve_data_dir() == DEMO_DIR
    monkeypatch.setenv(ENV_VAR, "")  # set but empty counts as unset
    assert resolve_data_dir() == DEMO_DIR


def test_root_or_mp20_dir_accepted(no_env, demo_copy):
    assert resolve_data_dir(demo_copy) == demo_copy / "mp20"
    assert resolve_data_dir(str(demo_copy / "mp20")) == demo_copy / "mp20"


def test_env_var_and_option_precedence(monkeypatch, demo_copy, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(demo_copy))
    assert resolve_data_dir() == demo_copy / "mp20"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    assert resolve_data_dir(DEMO_DIR) == DEMO_DIR  # the option wins over the environment
    with pytest.raises(DataError, match=f"environment variable {ENV_VAR}"):
        resolve_data_dir()


def test_env_var_on_shared_data(monkeypatch, shared_data_dir, mp20_dir):
    monkeypatch.setenv(ENV_VAR, str(shared_data_dir))
    assert resolve_data_dir() == mp20_dir
    assert split_path("train") == mp20_dir / "train_partial.csv.gz"


def no_data_path(root: Path, case: str) -> Path:
    """A path that is not a data dir: missing, an empty dir, a dir whose mp20/ holds no splits, a file."""
    if case == "missing":
        return root / "missing"
    if case == "no-splits":
        (root / "mp20").mkdir()
        (root / "mp20" / "README.md").write_text("splits not downloaded")
    if case == "a-file":
        (root / "val.csv.gz").write_bytes(b"")
        return root / "val.csv.gz"
    return root


@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", "does not exist"),
        ("empty", "holds no MP-20 split files"),
        ("no-splits", "holds no MP-20 split files"),
        ("a-file", "is not a directory"),
    ],
)
def test_clear_error_when_no_data(no_env, tmp_path, case, problem):
    path = no_data_path(tmp_path, case)
    with pytest.raises(DataError) as info:
        resolve_data_dir(path)
    message = str(info.value)
    assert problem in message and str(path) in message and str(path / "mp20") in message
    assert "--data-dir" in message and ENV_VAR in message and "val.csv.gz" in message


def test_missing_split_and_bad_files(tmp_path):
    (tmp_path / "val.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="no test split .*test.csv.gz"):
        next(iter_split("test", tmp_path))
    with pytest.raises(DataError, match="no train split .*train.csv.gz or train_partial.csv.gz"):
        split_formulas("train", tmp_path)
    with pytest.raises(DataError, match="cannot read .*val.csv.gz"):
        next(iter_split("val", tmp_path))
    pd.DataFrame({"material_id": ["mp-1"], "structure": ["x"]}).to_csv(tmp_path / "val.csv.gz", index=False)
    with pytest.raises(DataError, match="no 'cif' column"):
        load_split_frame("val", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        split_path("training", tmp_path)  # type: ignore[arg-type]


# --- reading ----------------------------------------------------------------------------------------------


def test_iter_split_shared_data(mp20_dir):
    frame = pd.read_csv(mp20_dir / "val.csv.gz", nrows=5)
    records = iter_split("val", mp20_dir.parent, limit=5)
    assert not isinstance(records, list)  # lazy: nothing parsed until asked
    records = list(records)
    assert [r.material_id for r in records] == frame["material_id"].tolist()
    for record, pretty in zip(records, frame["pretty_formula"], strict=True):
        assert isinstance(record, CrystalRecord)
        assert record.formula == Composition(pretty).reduced_formula
        assert record.structure.composition.reduced_formula == record.formula
    train = list(iter_split("train", mp20_dir, limit=2))
    assert len(train) == 2 and train[0].material_id.startswith("mp-")


def test_fast_metadata_matches_parsed_structures():
    """reduced_formula/nsites from the CIF's formula-sum line agree with full pymatgen parses (demo test)."""
    frame = load_split_frame("test", DEMO_DIR)
    records = list(iter_split("test", DEMO_DIR))
    assert len(records) == len(frame) == ROWS["test"]
    assert [r.formula for r in records] == frame["reduced_formula"].tolist()
    assert [len(r.structure) for r in records] == frame["nsites"].tolist()
    assert [r.material_id for r in records] == frame["material_id"].tolist()


def test_formula_sum_missing_falls_back_to_parse(tmp_path):
    frame = pd.read_csv(DEMO_DIR / "val.csv.gz", nrows=3)
    frame["cif"] = [c.replace("_chemical_formula_sum", "_removed_formula_sum") for c in frame["cif"]]
    frame[["cif"]].to_csv(tmp_path / "val.csv.gz", index=False)  # no material_id column either
    loaded = load_split_frame("val", tmp_path)
    records = list(iter_split("val", tmp_path))
    assert loaded["reduced_formula"].tolist() == [r.formula for r in records]
    assert loaded["nsites"].tolist() == [len(r.structure) for r in records]
    assert [r.material_id for r in records] == ["val-0", "val-1", "val-2"]


def test_split_formulas():
    formulas = load_split_frame("train", DEMO_DIR)["reduced_formula"]
    deduped = split_formulas("train", DEMO_DIR)
    assert len(deduped) == len(set(deduped)) == formulas.nunique() < len(formulas)
    assert set(deduped) == set(formulas)
    assert split_formulas("train", DEMO_DIR, seed=0) == deduped
    assert split_formulas("train", DEMO_DIR, seed=1) != deduped
    assert split_formulas("train", DEMO_DIR, seed=None) == list(dict.fromkeys(formulas))
    assert split_formulas("train", DEMO_DIR, dedupe=False, seed=None) == formulas.tolist()
    assert (
        split_formulas("train", DEMO_DIR, seed=1, limit=10) == split_formulas("train", DEMO_DIR, seed=1)[:10]
    )


def test_data_summary_demo():
    summary = data_summary(DEMO_DIR)
    assert summary["data_dir"] == str(DEMO_DIR)
    assert {s: v["rows"] for s, v in summary["splits"].items()} == ROWS
    assert summary["rows"] == sum(ROWS.values()) == sum(summary["nsites_histogram"].values())
    listed = set()
    for split in ROWS:
        listed |= {
            el
            for els in pd.read_csv(DEMO_DIR / f"{split}.csv.gz")["elements"]
            for el in ast.literal_eval(els)
        }
    assert summary["elements"] == sorted(listed, key=lambda el: Element(el).Z)
    assert summary["n_elements"] == len(listed)


def test_data_summary_shared(shared_data_dir, mp20_dir):
    summary = data_summary(shared_data_dir)
    assert summary["splits"]["train"]["file"] == "train_partial.csv.gz"
    meta = pd.read_csv(
        mp20_dir / "mp20_all_splits_meta.csv.gz", usecols=["split", "has_cif", "reduced_formula"]
    )
    with_cif = meta[meta["has_cif"]]
    assert {s: v["rows"] for s, v in summary["splits"].items()} == with_cif.groupby("split").size().to_dict()
    assert sum(summary["nsites_histogram"].values()) == summary["rows"] == len(with_cif)
    assert min(summary["nsites_histogram"]) >= 1 and max(summary["nsites_histogram"]) <= 20  # MP-20's cap
    meta_elements = set(re.findall(r"[A-Z][a-z]?", " ".join(with_cif["reduced_formula"].unique())))
    assert set(summary["elements"]) == meta_elements


# --- packaged demo subset ---------------------------------------------------------------------------------


def test_demo_subset_small_and_attributed():
    packaged = list(DEMO_DIR.glob("*.csv.gz")) + list(DEMO_DIR.glob("*.md"))
    assert {p.name for p in packaged} == {"train.csv.gz", "val.csv.gz", "test.csv.gz", "README.md"}
    assert sum(p.stat().st_size for p in packaged) <= 2_000_000
    readme = (DEMO_DIR / "README.md").read_text()
    assert "CC BY 4.0" in readme and "APL Materials 1, 011002 (2013)" in readme and "CDVAE" in readme


def test_demo_subset_rebuilds_identically(mp20_dir, tmp_path):
    assert build(mp20_dir, tmp_path) == ROWS
    for split in ROWS:
        name = f"{split}.csv.gz"
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes(), name

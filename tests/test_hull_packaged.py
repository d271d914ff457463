"""The MP-20 hull packaged in crystals/hull_data: E_hull identical to the hull built from the full data, the
fallback to it without a full data directory (the demo), its use as a cache of the full data's CSV, and the
reproducible build script."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest

from crystals.data import DEMO_DIR, ENV_VAR, iter_split
from crystals.hull import (
    CACHE_ENV,
    META_FILE,
    PACKAGED_DIR,
    REFERENCES_FILE,
    STABLE_GLOB,
    EnergyToHull,
    MP20Hull,
    file_sha256,
    hull_data_paths,
    packaged_hull_files,
)
from crystals.hull_data.build import build
from crystals.sample import Sample
from rewards.registry import resolve_reward

N_ROWS = 300  # MP-20 test rows checked against the data's e_above_hull_mp20hull column
N_DEMO = 6  # demo structures scored with CHGNet
PACKAGE_BUDGET = 600_000  # bytes: the repo's packaged data budget is 2 MB, 0.37 MB of it the demo subset


@pytest.fixture(autouse=True)
def _no_user_paths(monkeypatch, tmp_path):
    """Neither a data dir from the environment nor the user's hull cache may decide what a test sees."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def packaged() -> MP20Hull:
    return MP20Hull.load(packaged_hull_files()[0])


def test_packaged_files_fit_the_budget():
    stable, refs = packaged_hull_files()
    shipped = [*PACKAGED_DIR.glob("*.json.gz"), *PACKAGED_DIR.glob("*.md")]
    assert stable in shipped and refs in shipped
    assert sum(p.stat().st_size for p in shipped) <= PACKAGE_BUDGET


def test_packaged_hull_reproduces_the_full_data_hull(packaged, mp20_dir, shared_data_dir):
    meta = mp20_dir / META_FILE
    sha = file_sha256(meta)
    assert packaged.source_sha256 == sha[:16]  # built from this very CSV ...
    assert sha in (PACKAGED_DIR / "README.md").read_text()  # ... which the README names
    assert len(packaged.elements) == 89
    assert (PACKAGED_DIR / REFERENCES_FILE).read_bytes() == (
        shared_data_dir / "hull" / REFERENCES_FILE
    ).read_bytes()

    rows = pd.read_csv(
        mp20_dir / "test.csv.gz",
        usecols=["pretty_formula", "formation_energy_per_atom", "e_above_hull_mp20hull"],
    ).sample(N_ROWS, random_state=0)
    ours = [
        packaged.e_above_hull(f, e)
        for f, e in zip(rows.pretty_formula, rows.formation_energy_per_atom, strict=True)
    ]
    # the column is the full hull's E_hull rounded to 8 decimals
    np.testing.assert_allclose(ours, rows.e_above_hull_mp20hull, rtol=0, atol=1e-8)
    assert (rows.e_above_hull_mp20hull > 0.01).sum() > 20  # not only phases on the hull


def test_full_data_dir_uses_its_csv_and_the_packaged_copy_as_its_cache(
    packaged, shared_data_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="crystals.hull")
    meta, refs = hull_data_paths(shared_data_dir)
    assert (meta, refs) == (shared_data_dir / "mp20" / META_FILE, shared_data_dir / "hull" / REFERENCES_FILE)
    assert "hull of the data directory" in caplog.text
    hull = MP20Hull.load(meta, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # same sha256 as the packaged copy: nothing built or written
    assert f"read from {PACKAGED_DIR}" in caplog.text
    assert hull.stable == packaged.stable and hull.source_sha256 == file_sha256(meta)


def test_without_a_full_data_dir_the_packaged_hull_is_used(caplog):
    caplog.set_level(logging.INFO, logger="crystals.hull")
    assert hull_data_paths() == hull_data_paths(DEMO_DIR) == packaged_hull_files()
    assert "packaged MP-20 hull" in caplog.text
    to_hull = EnergyToHull.load()  # the demo: no data dir, no environment, no cache
    assert to_hull.references.mu["O"] == pytest.approx(-4.9467, abs=1e-4)
    # a stable phase lies on the hull: E_hull 0 at its formation energy, 0.1 at 0.1 eV/atom more
    for formula, e_form in to_hull.hull.stable["Fe-O"]:
        assert to_hull.hull.e_above_hull(formula, e_form) == pytest.approx(0.0, abs=1e-9)
        assert to_hull.hull.e_above_hull(formula, e_form + 0.1) == pytest.approx(0.1, abs=1e-9)


def test_evaluation_load_hull_works_on_the_demo_subset():
    from evaluation.metrics import HULL_NAME
    from evaluation.report import load_hull

    hull, note = load_hull(DEMO_DIR, "mp2020_corrected")
    assert isinstance(hull, EnergyToHull) and note == HULL_NAME and not hull.apply_mp2020


def test_ehull_reward_on_the_demo_subset_scores_real_structures():
    reward = resolve_reward("ehull", data_dir=DEMO_DIR, batch_size=N_DEMO)
    records = list(iter_split("test", DEMO_DIR, limit=N_DEMO))
    data = pd.read_csv(DEMO_DIR / "test.csv.gz", nrows=N_DEMO)
    out = reward([Sample.from_structure(r.structure) for r in records])
    assert [i["penalty"] for i in out.infos] == [None] * N_DEMO
    e_hull = np.array([i["e_above_hull"] for i in out.infos])
    e_form = np.array([i["e_form_per_atom"] for i in out.infos])
    np.testing.assert_allclose(out.rewards, -np.minimum(e_hull, 1.0))
    # CHGNet on known MP-20 crystals: close to the data's formation energies and E_hull (MAE ~0.02 eV/atom)
    assert np.median(np.abs(e_form - data.formation_energy_per_atom)) < 0.1
    assert np.median(np.abs(e_hull - data.e_above_hull_mp20hull)) < 0.1


def test_build_script_is_reproducible(mp20_dir, shared_data_dir, tmp_path):
    meta = pd.read_csv(mp20_dir / META_FILE)
    allowed = {"Li", "Fe", "P", "O", "Mn"}
    subset = meta[[set(re.findall(r"[A-Z][a-z]?", f)) <= allowed for f in meta.formula_prim_cell]]
    assert len(subset) > 50
    data = tmp_path / "data"
    (data / "mp20").mkdir(parents=True)
    (data / "hull").mkdir()
    subset.to_csv(data / "mp20" / META_FILE, index=False)
    (data / "mp20" / "test.csv.gz").write_bytes((DEMO_DIR / "test.csv.gz").read_bytes())
    (data / "hull" / REFERENCES_FILE).write_bytes((shared_data_dir / "hull" / REFERENCES_FILE).read_bytes())

    out = tmp_path / "out"
    out.mkdir()
    (out / "mp20-hull-0123456789abcdef.json.gz").write_bytes(b"stale")
    stable, refs = build(data, out)
    first = stable.read_bytes()
    assert sorted(out.glob(STABLE_GLOB)) == [stable]  # the stale hull is gone
    assert stable.name == f"mp20-hull-{file_sha256(data / 'mp20' / META_FILE)[:16]}.json.gz"
    assert refs.read_bytes() == (data / "hull" / REFERENCES_FILE).read_bytes()
    assert packaged_hull_files(out) == (stable, refs)

    assert build(data, out)[0].read_bytes() == first  # same source, same bytes
    rebuilt = MP20Hull.build(data / "mp20" / META_FILE)
    assert MP20Hull.load(stable).stable == {k: [tuple(x) for x in v] for k, v in rebuilt.stable.items()}

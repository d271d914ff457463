"""The MP-20 hull (build, disk cache, reproduction of the data's E_hull column), the MLIP energy route and the
E_hull reward with CHGNet energies.

The full hull is built once per machine into the default cache (~/.cache/crystal-grpo or
$CRYSTAL_GRPO_CACHE; ~75 s on an idle 2-core machine, longer on a busy one) and read, never rebuilt,
afterwards; the build and cache logic itself is tested on a small subset in a tmp dir.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

from crystals.data import iter_split
from crystals.hull import (
    META_FILE,
    EnergyToHull,
    HullError,
    MP20Hull,
    default_cache_dir,
    hull_data_paths,
    mp2020_corrected_energy,
)
from crystals.sample import Sample
from rewards.base import CrystalTextReward
from rewards.ehull import EHullReward

N_ROWS = 300  # rows checked against the data's e_above_hull_mp20hull column
N_CHGNET = 200  # MP-20 test structures scored with CHGNet


@pytest.fixture(scope="session")
def energy_to_hull(shared_data_dir) -> EnergyToHull:
    return EnergyToHull.load(shared_data_dir, default_cache_dir())


def refuse_builds(monkeypatch):
    """A cached (or packaged) hull must be read, never rebuilt: building raises from here on."""

    def build(meta_csv):
        raise AssertionError(f"the hull of {meta_csv} was rebuilt instead of read")

    monkeypatch.setattr(MP20Hull, "build", build)


def test_subset_build_matches_a_direct_phase_diagram_and_caches(tmp_path, mp20_dir, monkeypatch):
    meta = pd.read_csv(mp20_dir / META_FILE)
    allowed = {"Li", "Fe", "P", "O", "Mn"}
    subset = meta[[set(Composition(f).chemical_system.split("-")) <= allowed for f in meta.formula_prim_cell]]
    assert len(subset) > 50
    csv = tmp_path / "subset.csv.gz"
    subset.to_csv(csv, index=False)

    hull = MP20Hull.load(csv, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("mp20-hull-*.json.gz"))) == 1
    with monkeypatch.context() as patch:
        refuse_builds(patch)
        cached = MP20Hull.load(csv, cache_dir=tmp_path / "cache")
    assert cached.stable == {k: [tuple(x) for x in v] for k, v in hull.stable.items()}

    entries = [
        PDEntry(Composition(f), e * Composition(f).num_atoms)
        for f, e in zip(subset.formula_prim_cell, subset.formation_energy_per_atom, strict=True)
    ]
    direct = PhaseDiagram(entries + [PDEntry(Composition(el), 0.0) for el in allowed])
    for entry, formula, e_form in zip(
        entries[:80], subset.formula_prim_cell, subset.formation_energy_per_atom, strict=False
    ):
        expected = direct.get_decomp_and_e_above_hull(entry, allow_negative=True)[1]
        assert cached.e_above_hull(formula, e_form) == pytest.approx(expected, abs=1e-9)

    other = tmp_path / "other.csv.gz"
    subset.iloc[: len(subset) // 2].to_csv(other, index=False)
    MP20Hull.load(other, cache_dir=tmp_path / "cache")  # a different file: a different cache entry
    assert len(list((tmp_path / "cache").glob("mp20-hull-*.json.gz"))) == 2


def test_full_hull_is_read_not_built_and_reproduces_the_data_column(energy_to_hull, mp20_dir, monkeypatch):
    meta, _ = hull_data_paths(mp20_dir)
    refuse_builds(monkeypatch)  # the packaged copy serves the shared CSV
    hull = MP20Hull.load(meta, default_cache_dir())
    assert len(hull.elements) == 89

    rows = pd.read_csv(mp20_dir / "test.csv.gz", nrows=N_ROWS)
    ours = np.array(
        [
            hull.e_above_hull(f, e)
            for f, e in zip(rows.pretty_formula, rows.formation_energy_per_atom, strict=True)
        ]
    )
    errors = np.abs(ours - rows.e_above_hull_mp20hull.to_numpy())
    assert errors.mean() < 0.01, f"MAE {errors.mean():.4f} eV/atom"
    assert np.median(errors) < 1e-3


def test_hull_new_chemical_systems_and_unknown_elements(energy_to_hull):
    hull = energy_to_hull.hull
    new = Composition("LiBeNaMgAl")  # five light elements: no MP-20 phase spans this system
    assert new.chemical_system not in hull.stable
    base = hull.e_above_hull(new, -0.5)
    assert np.isfinite(base)
    assert hull.e_above_hull(new, -0.4) == pytest.approx(
        base + 0.1, abs=1e-9
    )  # E_hull is E_f minus a constant
    with pytest.raises(HullError, match="Po"):
        hull.e_above_hull("PoO2", -1.0)
    with pytest.raises(HullError, match="Po"):
        energy_to_hull.references.formation_energy_per_atom("PoO2", -30.0)


@pytest.fixture(scope="module")
def chgnet_scored(mp20_dir, energy_to_hull):
    """(structures, formation energies from the data, EHullReward output) for N_CHGNET test structures."""
    records = list(iter_split("test", mp20_dir, limit=N_CHGNET))
    structures = [r.structure for r in records]
    data = pd.read_csv(mp20_dir / "test.csv.gz", nrows=N_CHGNET, usecols=["formation_energy_per_atom"])
    reward = EHullReward(hull=energy_to_hull, batch_size=32)
    return (
        structures,
        data.formation_energy_per_atom.to_numpy(),
        reward([Sample.from_structure(s) for s in structures]),
    )


def test_ehull_of_known_crystals_with_chgnet_is_small(chgnet_scored):
    _, _, out = chgnet_scored
    assert [i["penalty"] for i in out.infos] == [None] * N_CHGNET
    e_hull = np.array([i["e_above_hull"] for i in out.infos])
    assert np.median(e_hull) < 0.1, f"median E_hull {np.median(e_hull):.3f} eV/atom"
    np.testing.assert_allclose(out.rewards, -np.minimum(e_hull, 1.0))


def test_chgnet_energies_are_already_on_the_mp2020_corrected_scale(chgnet_scored, energy_to_hull):
    structures, e_form_data, out = chgnet_scored
    e_form_raw = np.array([i["e_form_per_atom"] for i in out.infos])
    assert np.abs(e_form_raw - e_form_data).mean() < 0.05
    oxides = [i for i, s in enumerate(structures) if "O" in s.composition and len(s.composition) > 1][:15]
    assert len(oxides) >= 10
    twice = [
        energy_to_hull.references.formation_energy_per_atom(
            structures[i].composition,
            mp2020_corrected_energy(structures[i], out.infos[i]["energy_per_atom"] * len(structures[i])),
        )
        for i in oxides
    ]
    # correcting CHGNet energies again counts the oxide correction twice: far too stable
    assert np.mean(np.array(twice) - e_form_data[oxides]) < -0.3
    assert np.abs(e_form_raw[oxides] - e_form_data[oxides]).mean() < 0.05


def test_ehull_reward_penalties_never_beat_a_valid_structure(energy_to_hull):
    reward = CrystalTextReward(EHullReward(hull=energy_to_hull, clip=1.5))
    assert reward.failure_penalty == -1.5
    texts = [
        "garbage",
        "5 5 5 90 90 90 Na 0 0 0 Cl 0.01 0 0",
        "1000 1000 1000 90 90 90 Na 0 0 0 Cl 0.5 0.5 0.5",
    ]
    rewards, infos = reward([{"formula": "NaCl"}] * 3, texts)
    assert rewards == [-1.5] * 3
    assert [i["penalty"] for i in infos] == ["parse_error:bad_lattice", "overlap", "failure:huge_cell"]


def test_ehull_refuses_non_mp_energy_scales(shared_data_dir):
    from ase.calculators.emt import EMT

    from rewards.ase_calculator import ASEPotential

    with pytest.raises(ValueError, match="not on the Materials Project scale"):
        EHullReward(potential=ASEPotential(EMT()), data_dir=shared_data_dir)


def test_elemental_references_match_the_readme(energy_to_hull):
    mu = energy_to_hull.references.mu
    assert mu["O"] == pytest.approx(-4.9467, abs=1e-4) and mu["Fe"] == pytest.approx(-8.4700, abs=1e-4)
    assert len(mu) == 89

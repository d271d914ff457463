"""Potential rewards: CHGNet equals a direct prediction, caching, and per-sample failure isolation on real bad
structures (huge cell, isolated atoms, too many neighbours/images, NaN, crash, timeout); any ASE calculator."""

from __future__ import annotations

import importlib.util
import math
import time

import numpy as np
import pytest
from ase.calculators.emt import EMT
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from crystals.data import iter_split
from crystals.guard import GuardConfig, guard_structure
from crystals.matching import structure_key
from crystals.potentials import load_chgnet, sevenn_calculator, uma_calculator
from crystals.sample import Sample
from crystals.text import parse_structure
from rewards.ase_calculator import ASECalculatorReward, ASEPotential
from rewards.base import CrystalTextReward
from rewards.chgnet_energy import CHGNetEnergyReward, CHGNetPotential
from rewards.penalties import PenaltyConfig
from rewards.potential import EnergyReward
from rewards.registry import resolve_reward
from tests.reward_structures import fcc, rocksalt, text_of, zincblende


def metas_of(texts_or_formulas: list[str]) -> list[dict]:
    return [{"formula": f} for f in texts_or_formulas]


@pytest.fixture(scope="module")
def mp20_structures(mp20_dir) -> list[Structure]:
    return [record.structure for record in iter_split("test", mp20_dir, limit=6)]


@pytest.fixture(scope="module")
def chgnet():
    return load_chgnet()


# -- CHGNet ----------------------------------------------------------------------------------------------------
def test_chgnet_reward_equals_direct_prediction(mp20_structures, chgnet):
    texts = [text_of(s) for s in mp20_structures]
    reward = CrystalTextReward(resolve_reward("chgnet-etot", batch_size=4))
    rewards, infos = reward(metas_of([s.composition.reduced_formula for s in mp20_structures]), texts)
    parsed = [parse_structure(t) for t in texts]
    direct = chgnet.predict_structure(parsed, task="e", batch_size=1)
    assert [i["penalty"] for i in infos] == [None] * len(texts)
    np.testing.assert_allclose(rewards, [-float(p["e"]) for p in direct], atol=1e-5)
    assert all(i["energy_per_atom"] == pytest.approx(-r) for i, r in zip(infos, rewards, strict=True))

    # the same crystals again (rotated, sites shuffled): all from the cache, same values
    again = []
    for s in parsed:
        moved = s.copy()
        moved.apply_operation(SymmOp.from_axis_angle_and_translation([0, 0, 1], 30))
        again.append(Structure.from_sites(list(reversed(moved.sites))))
    out = reward.reward([Sample.from_structure(s) for s in again])
    assert all(i["cached"] for i in out.infos)
    np.testing.assert_allclose(out.rewards, rewards, atol=1e-5)


def test_chgnet_per_cell_and_duplicates_in_one_batch(mp20_structures):
    s = mp20_structures[0]
    per_atom = CHGNetEnergyReward(batch_size=8)
    per_cell = CHGNetEnergyReward(batch_size=8, per_cell=True)
    out = per_atom([Sample.from_structure(s), Sample.from_structure(s.copy())])
    assert out.rewards[0] == out.rewards[1] and [i["cached"] for i in out.infos] == [False, True]
    assert per_cell([Sample.from_structure(s)]).rewards[0] == pytest.approx(out.rewards[0] * len(s), rel=1e-6)


def test_structure_key_ignores_site_order_and_wrapping_but_not_geometry():
    s = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert structure_key(s) == structure_key(
        Structure(Lattice.cubic(4.0), ["Cl", "Na"], [[1.5, 0.5, -0.5], [1, 0, 0]])
    )
    assert structure_key(s) != structure_key(
        Structure(Lattice.cubic(4.01), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    )


BAD_TEXTS = {
    # 2 atoms in a 1000 A cube: nothing within the cutoff, energies of free atoms
    "huge_cell": "1000 1000 1000 90 90 90 Fe 0 0 0 Fe 0.5 0.5 0.5",
    # 1 A cube: passes the covalent rule for H (self-image 1 A > 0.31 A) but ~900 neighbours within 6 A
    "too_many_neighbors": "1 1 1 90 90 90 H 0 0 0",
    # beta = 0.2 deg with c = 1000 A (shortest vector still 3.6 A): a 0.01 A plane spacing, ~3e4 images
    "too_many_images": "3 3 1000 90 0.2 90 Cu 0 0 0",
    # 8 Na 6.1 A apart: each atom is isolated at CHGNet's 6 A cutoff, its graph converter raises
    "prepare_error:ValueError": "12.2 12.2 12.2 90 90 90 "
    + " ".join(f"Na {x} {y} {z}" for x in (0, 0.5) for y in (0, 0.5) for z in (0, 0.5)),
}


def test_bad_cells_fail_alone_and_the_rest_is_scored(mp20_structures):
    good = text_of(mp20_structures[1])
    texts = [good, *BAD_TEXTS.values(), good]
    reward = CrystalTextReward(CHGNetEnergyReward(batch_size=8, penalties=PenaltyConfig(failure=-0.4)))
    start = time.perf_counter()
    rewards, infos = reward(metas_of([mp20_structures[1].composition.reduced_formula] * len(texts)), texts)
    assert time.perf_counter() - start < 60
    assert [i["penalty"] for i in infos] == [None] + [f"failure:{k}" for k in BAD_TEXTS] + [None]
    assert rewards[1:-1] == [-0.4] * len(BAD_TEXTS)
    assert rewards[0] == rewards[-1] and rewards[0] > 0
    assert reward.reward.evaluator.failures == {k: 1 for k in BAD_TEXTS}


def test_guard_rejects_singular_and_nonfinite_cells():
    flat = Structure(
        Lattice([[3, 0, 0], [0, 3, 0], [3, 3, 0]]), ["Cu"], [[0, 0, 0]], validate_proximity=False
    )
    assert guard_structure(flat, GuardConfig()) == "zero_volume"
    ok = fcc("Cu", 3.6)
    assert guard_structure(ok, GuardConfig()) is None
    assert guard_structure(ok, GuardConfig(max_volume_per_atom=5.0)) == "huge_cell"


def _chgnet_subclass(mode: str):
    """The real CHGNet, except that a batch holding Zn raises (mode "raise") or gets NaN for Zn ("nan")."""
    from chgnet.model import CHGNet

    class Misbehaving(CHGNet):
        def predict_graph(self, graphs, **kwargs):
            # CrystalGraph.composition is a formula string such as "Zn4 O4"
            has_zinc = [any(t.rstrip("0123456789.") == "Zn" for t in g.composition.split()) for g in graphs]
            if mode == "raise" and any(has_zinc):
                raise RuntimeError("simulated CUDA error")
            preds = super().predict_graph(graphs, **kwargs)
            listed = [preds] if isinstance(preds, dict) else preds
            for zinc, pred in zip(has_zinc, listed, strict=True):
                if zinc:
                    pred["e"] = np.float32(np.nan)
            return preds

    return Misbehaving.load(verbose=False)


@pytest.mark.parametrize(
    ("mode", "reason"), [("nan", "failure:nonfinite_energy"), ("raise", "failure:predict_error:RuntimeError")]
)
def test_nan_or_crashing_potential_fails_only_that_sample(mode, reason, chgnet):
    structures = [
        rocksalt(4.2, "Mg", "O"),
        zincblende(4.6, "Zn", "O"),
        rocksalt(5.6, "Na", "Cl"),
    ]
    reward = CHGNetEnergyReward(potential=CHGNetPotential(model=_chgnet_subclass(mode), batch_size=8))
    out = reward([Sample.from_structure(s) for s in structures])
    assert [i["penalty"] for i in out.infos] == [None, reason, None]
    assert out.rewards[1] == -0.1 and all(math.isfinite(r) for r in out.rewards)
    direct = chgnet.predict_structure([structures[0], structures[2]], task="e")
    np.testing.assert_allclose([out.rewards[0], out.rewards[2]], [-float(p["e"]) for p in direct], atol=1e-5)


# -- any ASE calculator ------------------------------------------------------------------------------------
class CountingEMT(EMT):
    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        type(self).calls += 1
        super().calculate(atoms, list(properties), system_changes or [])


class SlowOnGold(EMT):
    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        if "Au" in atoms.get_chemical_symbols():
            time.sleep(60)  # a hung calculation
        super().calculate(atoms, list(properties), system_changes or [])


def test_ase_reward_equals_the_calculator_and_gate_runs_first():
    from pymatgen.io.ase import AseAtomsAdaptor

    cu, ni = fcc("Cu", 3.7), fcc("Ni", 3.5)
    overlapping = Structure(Lattice.cubic(5.0), ["Cu", "Cu"], [[0, 0, 0], [0.05, 0, 0]])
    CountingEMT.calls = 0
    reward = ASECalculatorReward(CountingEMT())
    out = reward([Sample.from_structure(s) for s in (cu, overlapping, ni)])
    assert [i["penalty"] for i in out.infos] == [None, "overlap", None]
    assert CountingEMT.calls == 2  # the overlapping cell never reached the calculator
    for s, r in zip((cu, ni), (out.rewards[0], out.rewards[2]), strict=True):
        atoms = AseAtomsAdaptor.get_atoms(s)
        atoms.calc = EMT()
        assert r == pytest.approx(-atoms.get_potential_energy() / len(atoms), abs=1e-9)


def test_timeout_fails_only_the_hung_sample():
    reward = ASECalculatorReward(SlowOnGold(), guard=GuardConfig(timeout_s=1.0))
    start = time.perf_counter()
    out = reward([Sample.from_structure(fcc(el, a)) for el, a in (("Cu", 3.6), ("Au", 4.1), ("Ni", 3.5))])
    assert time.perf_counter() - start < 30  # interrupted after 1 s, not waited for (60 s)
    assert [i["penalty"] for i in out.infos] == [None, "failure:timeout", None]
    assert math.isfinite(out.rewards[0]) and math.isfinite(out.rewards[2])


def test_brief_relaxation_lowers_the_energy():
    strained = fcc("Cu", 3.9)
    unrelaxed = ASECalculatorReward(EMT())([Sample.from_structure(strained)])
    relaxed = ASECalculatorReward(EMT(), relax_steps=10)([Sample.from_structure(strained)])
    assert relaxed.rewards[0] > unrelaxed.rewards[0] + 0.01  # reward = -E: relaxing raises it


def test_volume_scan_scores_the_best_rescaled_cell():
    from pymatgen.io.ase import AseAtomsAdaptor

    factors = (0.5, 0.63, 0.79, 1.0, 1.26, 1.59, 2.0)
    opened = fcc("Cu", 4.4)  # ~1.8x the volume EMT likes

    def emt_energy(structure: Structure) -> float:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = EMT()
        return atoms.get_potential_energy() / len(atoms)

    def rescaled(factor: float) -> Structure:
        copy = opened.copy()
        copy.scale_lattice(opened.volume * factor)
        return copy

    plain = EnergyReward(ASEPotential(EMT()))([Sample.from_structure(opened)])
    scanned = EnergyReward(ASEPotential(EMT()), volume_scan=factors)([Sample.from_structure(opened)])
    energies = [emt_energy(rescaled(f)) for f in factors]
    assert scanned.rewards[0] == pytest.approx(-min(energies), abs=1e-9)
    assert plain.rewards[0] == pytest.approx(-emt_energy(opened), abs=1e-9)
    assert factors[int(np.argmin(energies))] < 1 and scanned.rewards[0] > plain.rewards[0] + 0.1


class DensityPotential:
    """E = (V/N - 12)^2 / 100 eV/atom; refuses cells above 20 A^3 per atom, NaN below 6 (a stand-in for a
    potential that cannot take isolated atoms and breaks on crushed cells)."""

    name, batch_size, energy_scale = "density", 8, "other"

    def prepare(self, structure: Structure) -> float:
        volume_per_atom = structure.volume / len(structure)
        if volume_per_atom > 20:
            raise ValueError("isolated atoms")
        return volume_per_atom

    def predict(self, volumes: list[float]) -> list[float]:
        return [math.nan if v < 6 else (v - 12) ** 2 / 100 for v in volumes]

    def calculator(self):
        raise NotImplementedError


def test_volume_scan_leaves_out_rescalings_the_potential_cannot_take():
    reward = EnergyReward(DensityPotential(), volume_scan=(0.25, 1.0, 2.0, 4.0))
    cells = [fcc("Cu", a) for a in (4.0, 6.0)]  # 16 and 54 A^3 per atom
    out = reward([Sample.from_structure(s) for s in cells])
    # 16: x0.25 is NaN and x2, x4 are refused, so x1 stands; 54: only x0.25 (13.5) is taken
    assert out.rewards[0] == pytest.approx(-((16 - 12) ** 2) / 100)
    assert out.rewards[1] == pytest.approx(-((13.5 - 12) ** 2) / 100)
    alone = EnergyReward(DensityPotential(), volume_scan=(1.0, 2.0))([Sample.from_structure(cells[1])])
    assert alone.infos[0]["penalty"] == "failure:prepare_error:ValueError"
    with pytest.raises(ValueError, match="positive volume factors"):
        EnergyReward(DensityPotential(), volume_scan=(1.0, 0.0))


def test_failures_are_counted_and_only_a_raising_potential_warns_once(caplog):
    reward = EnergyReward(DensityPotential(), guard=GuardConfig(max_volume_per_atom=100.0))
    cells = [
        fcc("Cu", 7.0),
        fcc("Ni", 7.2),
        fcc("Cu", 8.0),
        fcc("Cu", 2.0),
        fcc("Cu", 4.0),
    ]  # 86, 93, 128, 2, 16
    with caplog.at_level("DEBUG", logger="rewards.potential"):
        out = reward([Sample.from_structure(s) for s in cells])
    assert [i["penalty"] for i in out.infos] == [
        "failure:prepare_error:ValueError",
        "failure:prepare_error:ValueError",
        "failure:huge_cell",
        "failure:nonfinite_energy",
        None,
    ]
    assert reward.evaluator.failures == {"prepare_error:ValueError": 2, "huge_cell": 1, "nonfinite_energy": 1}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "prepare_error" in warned[0]
    assert sum("no energy" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.skipif(importlib.util.find_spec("sevenn") is not None, reason="sevenn is installed")
def test_missing_extras_raise_clear_import_errors(tmp_path):
    with pytest.raises(ImportError, match=r"crystal-grpo\[sevenn\]"):
        sevenn_calculator()
    if importlib.util.find_spec("fairchem") is None:
        with pytest.raises(ImportError, match=r"crystal-grpo\[uma\]"):
            uma_calculator(tmp_path / "uma.pt")

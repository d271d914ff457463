"""Validity checks on hand-made real structures, periodic distances against independent oracles, and the
SMACT test against a brute-force enumeration with smact's own electronegativity test."""

from __future__ import annotations

import itertools
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import smact
from ase.data import covalent_radii
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Composition, Element, Lattice, Structure
from smact.screening import pauling_test

from crystals.text import parse_structure
from crystals.validity import (
    Check,
    check_atom_count,
    check_composition_smact,
    check_species,
    check_structure_cdvae,
    check_structure_covalent,
    min_interatomic_distance,
    periodic_distances,
)

FCC = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]


def rock_salt(a: float = 5.64) -> Structure:
    """Conventional NaCl cell: Na on fcc sites, Cl shifted by (1/2, 0, 0); nearest Na-Cl = a/2."""
    return Structure(Lattice.cubic(a), ["Na"] * 4 + ["Cl"] * 4, FCC + [[x + 0.5, y, z] for x, y, z in FCC])


def cu3au() -> Structure:
    """L1_2 Cu3Au, a = 3.75 A: Au at the corner, Cu at the face centres."""
    return Structure(Lattice.cubic(3.75), ["Au", "Cu", "Cu", "Cu"], FCC)


def neighbour_oracle(s: Structure) -> float:
    """Smallest distance from pymatgen's neighbour search (its own exact image bounds, self-images included),
    searched within the shortest lattice vector, which bounds the answer."""
    radius = min(s.lattice.abc) + 1e-6
    return min(n.nn_distance for neighbours in s.get_all_neighbors(radius) for n in neighbours)


def test_check_is_truthy_exactly_when_ok():
    assert Check(True) and not Check(False, "why")
    assert Check(False, "why").reason == "why"


# --- distances ----------------------------------------------------------------------------------------------


def test_min_distance_includes_a_sites_own_images():
    # One atom in a 3 A cube: no other site, but its images are 3 A away. pymatgen's distance_matrix is [[0]].
    s = Structure(Lattice.cubic(3.0), ["Po"], [[0.2, 0.3, 0.4]])
    assert min_interatomic_distance(s) == pytest.approx(3.0)
    # In the conventional rock-salt cell a site's own images are the cell translations, a = 5.64 A away
    # (the fcc neighbours at a/sqrt(2) are other sites of the cell).
    assert np.allclose(periodic_distances(rock_salt()).diagonal(), 5.64)


def test_short_cell_vector_fails_cdvae_rule_that_minimum_image_misses():
    # a = (5,0,0), b = (4.8,0.3,0): b - a has length 0.36 A, so the single Li overlaps its own image.
    s = Structure(Lattice([[5, 0, 0], [4.8, 0.3, 0], [0, 0, 5]]), ["Li"], [[0, 0, 0]])
    assert s.distance_matrix.max() == 0  # what a minimum-image check with a padded diagonal sees
    assert min_interatomic_distance(s) == pytest.approx(np.hypot(0.2, 0.3))
    check = check_structure_cdvae(s)
    assert not check and "Li-Li (periodic image) 0.36 A" in check.reason


def test_distances_match_pymatgen_minimum_image_off_the_diagonal():
    s = rock_salt()
    ours, theirs = periodic_distances(s), s.distance_matrix
    off = ~np.eye(len(s), dtype=bool)
    assert np.allclose(ours[off], theirs[off])


@settings(max_examples=60, deadline=None)
@given(
    st.floats(2.0, 6.0),
    st.integers(1, 3),
    st.floats(-0.5, 0.5),
    st.floats(0.2, 1.5),
    st.lists(st.floats(-8.0, 8.0), min_size=2, max_size=2),
    st.floats(0.3, 3.0),
    st.integers(0, 2**32 - 1),
)
def test_min_distance_in_sheared_cells_matches_neighbour_search(a, shear, wobble, by, c_xy, cz, seed):
    """Strongly sheared cells, b ~ n a: the nearest image is many cells away in the input basis."""
    lattice = Lattice([[a, 0, 0], [shear * a + wobble, by, 0], [*c_xy, cz]])
    frac = np.random.default_rng(seed).random((3, 3))
    s = Structure(lattice, ["Li", "O", "O"], frac)
    assert min_interatomic_distance(s) == pytest.approx(neighbour_oracle(s), rel=1e-9)


@pytest.mark.parametrize(
    "lattice",
    [
        "500 400 300 1 2 2.9",  # near-flat: the input basis would need ~10^5 images per axis
        "1000 0.1 1000 179 1 179",
        "0.1 0.1 1000 90 90 0.5",
        "30 30 30 2 2 3",
    ],
)
def test_extreme_parsed_cells_stay_cheap_and_exact(lattice):
    s = parse_structure(f"{lattice} Li 0.1 0.2 0.3 O 0.5 0.5 0.5")
    start = time.perf_counter()
    distances = periodic_distances(s)
    assert time.perf_counter() - start < 0.5
    # Never above a site's shortest image in the LLL basis, and exact: matches pymatgen's neighbour search.
    assert distances.min() <= np.linalg.norm(s.lattice.lll_matrix, axis=1).min() + 1e-9
    assert distances.min() == pytest.approx(neighbour_oracle(s), rel=1e-9)
    assert not check_structure_cdvae(s) or distances.min() >= 0.5


def test_min_distance_on_mp20_matches_neighbour_search(mp20_dir):
    frame = pd.read_csv(mp20_dir / "test.csv.gz").sample(n=60, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    for s in structures:
        assert min_interatomic_distance(s) == pytest.approx(neighbour_oracle(s), rel=1e-9)
        # Real crystals pass both structural rules.
        assert check_structure_cdvae(s) and check_structure_covalent(s)


# --- structural checks on hand-made structures --------------------------------------------------------------


def test_rock_salt_is_valid_everywhere():
    s = rock_salt()
    assert min_interatomic_distance(s) == pytest.approx(2.82)
    for check in (
        check_structure_cdvae(s),
        check_structure_covalent(s),
        check_composition_smact(s.composition),
        check_species(s, ["Na", "Cl"]),
        check_atom_count(s),
    ):
        assert check.ok, check.reason


def test_overlapping_atoms_fail_both_structural_rules():
    s = rock_salt()
    s.append("Na", [0.5 + 0.3 / 5.64, 0, 0])  # 0.30 A from the Cl at (1/2, 0, 0)
    cdvae = check_structure_cdvae(s)
    assert not cdvae
    assert cdvae.reason == "overlap: Cl-Na 0.30 A < 0.50 A"
    covalent = check_structure_covalent(s)
    assert not covalent and "0.30 A" in covalent.reason


def test_covalent_rule_is_stricter_than_cdvae():
    # Rock salt squeezed to a = 2.6 A: Na-Cl = 1.30 A, above 0.5 A but not above
    # 0.5 (r_Na + r_Cl) = 0.5 (1.66 + 1.02) = 1.34 A; Na-Na = 1.84 A stays above 1.66 A.
    s = rock_salt(2.6)
    assert check_structure_cdvae(s)
    threshold = 0.5 * (covalent_radii[11] + covalent_radii[17])
    check = check_structure_covalent(s)
    assert not check
    assert check.reason == f"overlap: Na-Cl 1.30 A <= {threshold:.2f} A (0.5 x radii sum)"
    assert check_structure_covalent(s, scale=0.45)  # 1.30 > 0.45 * 2.68 = 1.21, 1.84 > 0.45 * 3.32
    assert not check_structure_covalent(rock_salt(2.3))  # now Na-Na 1.63 A <= 1.66 A fails as well


def test_tiny_volume_fails_cdvae_rule():
    s = Structure(Lattice.cubic(0.45), ["Li"], [[0, 0, 0]])  # 0.091 A^3
    check = check_structure_cdvae(s)
    assert not check and check.reason == "volume 0.0911 A^3 < 0.1 A^3"
    assert check_structure_cdvae(s, min_volume=0.05, min_distance=0.4)


def test_atom_count_limit():
    base = Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]])
    assert check_atom_count(base * (4, 5, 1))  # 20 atoms
    check = check_atom_count(base * (3, 7, 1))
    assert not check and check.reason == "21 atoms > 20"
    assert check_atom_count(base * (3, 7, 1), max_atoms=21)


def test_species_preservation():
    s = rock_salt()
    assert check_species(s, {"Cl", "Na"})
    assert check_species(s, [Element("Na"), Element("Cl")])
    assert check_species(s, ["Na", "Br"]).reason == "missing Br; extra Cl"
    assert check_species(s, ["Na"]).reason == "extra Cl"
    assert check_species(s, ["Na", "Cl", "O"]).reason == "missing O"


# --- SMACT --------------------------------------------------------------------------------------------------


def test_charge_imbalanced_fluorite_nacl2_is_only_compositionally_invalid():
    # CaF2 (fluorite, a = 5.46 A) with Ca -> Na and F -> Cl: sound geometry, but Na+ Cl2 cannot balance.
    quarter = [[x / 4, y / 4, z / 4] for x in (1, 3) for y in (1, 3) for z in (1, 3)]
    s = Structure(Lattice.cubic(5.46), ["Na"] * 4 + ["Cl"] * 8, FCC + quarter)
    assert check_structure_cdvae(s) and check_structure_covalent(s) and check_atom_count(s)
    check = check_composition_smact(s.composition)
    assert not check and check.reason == "no charge-neutral combination of oxidation states"
    assert check_composition_smact(
        Structure(Lattice.cubic(5.46), ["Ca"] * 4 + ["F"] * 8, FCC + quarter).composition
    )


def test_smact_alloys_and_elements_are_valid():
    assert check_composition_smact(cu3au().composition).reason == "all-metal alloy"
    assert check_composition_smact("Si").reason == "single element"
    assert check_composition_smact("He").reason == "single element"


@pytest.mark.parametrize(
    ("formula", "ok", "reason_part"),
    [
        ("NaCl", True, "charge-neutral"),
        ("Fe2O3", True, "charge-neutral"),
        ("NaCl2", False, "no charge-neutral"),  # Na+1 Cl-1 is the only ordering-compatible choice
        ("Fe3O4", False, "no charge-neutral"),  # mixed valence: one state per element, as in CDVAE
        ("NaB", False, "more electronegative"),  # B has no negative states: only Na-1 B+1 balances
        ("HeO", False, "no oxidation states for He"),
        ("OgCl", False, "no oxidation states for Og"),  # smact has no data beyond Lr
        ("PmCl3", True, "no electronegativity data"),  # Pm has none: ordering test skipped
        ("PmCl2", True, "no electronegativity data"),  # Pm+2
        ("PmCl5", False, "no charge-neutral"),
    ],
)
def test_smact_hand_made_compositions(formula, ok, reason_part):
    check = check_composition_smact(formula)
    assert check.ok is ok
    assert reason_part in check.reason


def test_smact_rejects_fractional_amounts():
    with pytest.raises(ValueError, match="integer"):
        check_composition_smact(Composition("Li0.5O0.25"))


def brute_force_smact(composition: Composition) -> bool:
    """Every combination of SMACT-2014 oxidation states, charge balance and smact's Pauling test (valid for
    elements that all have an electronegativity)."""
    amounts = composition.get_el_amt_dict()
    if len(amounts) == 1 or all(el in smact.metals for el in amounts):
        return True
    elements = [smact.Element(el) for el in amounts]
    counts = np.array(list(amounts.values()))
    enegs = [el.pauling_eneg for el in elements]
    for states in itertools.product(*[el.oxidation_states_smact14 or [] for el in elements]):
        if np.dot(states, counts) == 0 and pauling_test(states, enegs):
            return True
    return False


def test_smact_matches_brute_force_on_mp20(mp20_dir):
    formulas = pd.read_csv(mp20_dir / "test.csv.gz")["pretty_formula"].sample(n=400, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on noble gases without electronegativity
        compositions = [Composition(f) for f in formulas]
    compositions = [c for c in compositions if not {"Pm", "Rn", "Lr"} & {el.symbol for el in c}]
    verdicts = [bool(check_composition_smact(c)) for c in compositions]
    assert verdicts == [brute_force_smact(c) for c in compositions]
    assert 0 < sum(verdicts) < len(verdicts)  # the sample exercises both outcomes


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["H", "B", "C", "N", "O", "F", "S", "Cl", "I", "Na", "Mg", "Fe", "Au", "Te", "Sb", "Xe"]
        ),
        min_size=2,
        max_size=4,
        unique=True,
    ),
    st.lists(st.integers(1, 6), min_size=4, max_size=4),
)
def test_smact_matches_brute_force_on_random_compositions(elements, counts):
    composition = Composition(dict(zip(elements, counts[: len(elements)], strict=True)))
    assert bool(check_composition_smact(composition)) == brute_force_smact(composition)

"""crystals/separation.py: the heights it frees are those pymatgen's periodic distances free, the tokens it
forbids are exactly those whose every completion lands on an earlier atom, and sampling under it (HF, formula
grammar) writes structures that pass the covalent validity rule, with the masks replayed as sampled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.data import atomic_numbers, covalent_radii
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice

from crystals.grammar import structure_grammar
from crystals.separation import GRID, SeparationRule, free_grid
from crystals.text import parse_structure
from crystals.validity import check_structure_covalent
from grpo.constraint import ConstraintError, GrammarConstraint
from grpo.generation import HFGenerator, SamplingConfig, decode_responses, output_vocab_size
from tests.test_constraint import crystal_model  # noqa: F401  (the fixture)

LATTICE = "4.0 4.0 4.0 90 90 90"


def brute_force_free(lattice: Lattice, sites, symbols, new_symbol, x, y, scale=0.5) -> np.ndarray:
    """Each grid height tested with pymatgen's exact periodic distance (every image)."""
    free = []
    for k in range(GRID):
        point = [x, y, k / GRID]
        ok = True
        for site, symbol in zip(sites, symbols, strict=True):
            limit = scale * (
                covalent_radii[atomic_numbers[symbol]] + covalent_radii[atomic_numbers[new_symbol]]
            )
            ok &= lattice.get_distance_and_image(point, site)[0] > limit
        free.append(ok)
    return np.array(free)


@pytest.mark.parametrize("seed", range(6))
def test_free_grid_matches_pymatgen_periodic_distances(seed):
    """Random reduced-like cells, some of them narrow (where images beyond the first shell are nearer); a few
    lines of the grid against pymatgen's distance over every image."""
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(1.2, 6.0, 3)
    angles = rng.uniform(62, 88, 3) if seed % 2 else rng.uniform(92, 118, 3)
    lattice = Lattice.from_parameters(*lengths, *angles)
    symbols = list(rng.choice(["Cs", "O", "Si", "Ba"], 3))
    sites = rng.integers(0, GRID, (3, 3)) / GRID
    thresholds = 0.5 * (
        covalent_radii[[atomic_numbers[s] for s in symbols]] + covalent_radii[atomic_numbers["O"]]
    )
    ours = free_grid(lattice.matrix, sites, thresholds)
    for x, y in rng.integers(0, GRID, (4, 2)):
        assert np.array_equal(ours[x, y], brute_force_free(lattice, sites, symbols, "O", x / GRID, y / GRID))
    assert 0 < ours.mean() < 1  # each case blocks part of the cell


def test_a_grid_narrowed_atom_by_atom_equals_the_grid_built_at_once():
    """The cache narrows an atom's grid from the grid of the atom before it (same element) by one site."""
    from crystals import separation

    lattice = ("5.1", "4.3", "6.2", "80", "95", "112")
    atoms = ("O", "0.10", "0.20", "0.30", "O", "0.55", "0.15", "0.90", "Mg", "0.40", "0.70", "0.05")
    separation._GRIDS.clear()
    for end in range(0, len(atoms) + 1, 4):  # as sampling asks: atom after atom
        narrowed = separation._free_grid_of(lattice, atoms[:end], "O", 0.5)
    assert len(separation._GRIDS) == 4
    separation._GRIDS.clear()
    at_once = separation._free_grid_of(lattice, atoms, "O", 0.5)
    assert len(separation._GRIDS) == 1
    assert np.array_equal(narrowed.points, at_once.points) and 0 < at_once.points.mean() < 1
    assert np.array_equal(at_once.planes, at_once.points.any(axis=(1, 2)))


COORDINATE_PREFIXES = ["0", "0."] + [f"0.{d}" for d in range(10)] + [f"0.{n:02d}" for n in range(100)]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.lists(st.sampled_from(COORDINATE_PREFIXES), min_size=1, max_size=3),
)
def test_a_grids_box_answers_equal_the_points_of_the_box(seed, coordinates):
    """_FreeGrid.has_free answers along a line from running counts: the same as any() over the box's points
    (a sparse grid, so boxes both with and without a free point occur)."""
    from crystals.separation import _box, _FreeGrid

    points = np.random.default_rng(seed).random((GRID, GRID, GRID)) < 2e-4
    grid = _FreeGrid(points)
    box = _box(tuple(coordinates))
    expected = bool(points[tuple(slice(*r) for r in box)].any())
    assert grid.has_free(tuple(coordinates)) is expected
    assert grid.has_free(tuple(coordinates)) is expected  # asked again: from the counts built the first time
    assert grid.has_free(("0.", "x")) is None  # not a coordinate the grammar writes


def test_forbidden_tokens_are_those_whose_completions_all_overlap():
    """Na at the origin of a 4 A cube, Cl at x = y = 0: Na-Cl needs 0.5 (1.66 + 1.02) = 1.34 A, so only
    z in 0.34..0.66 is free. Whole-number tokens and digit-level tokens alike."""
    rule = SeparationRule(0.5)
    text = f"{LATTICE}\nNa 0.00 0.00 0.00\nCl 0.00 0.00"
    assert rule.watches(text) and rule.watches(text + " 0.")
    whole = [f" 0.{k:02d}" for k in range(GRID)]
    forbidden = set(rule.forbidden(text, range(GRID), whole))
    assert forbidden == {k for k in range(GRID) if not 34 <= k <= 66}
    pieces = [" 0.", " 0", "3", "4", "9", ".", "35\n", " 0.3", " 0.2"]
    ids = range(len(pieces))
    # y is still being written for the tokens without a space; " 0.2" leaves only 0.20-0.29, all taken
    assert [pieces[i] for i in rule.forbidden(text, ids, pieces)] == [" 0.2"]
    assert [pieces[i] for i in rule.forbidden(text + " 0.", ids, pieces)] == ["9"]  # 0.90-0.99 wrap to Na
    # at "0.3" only the second digit is left: 0.30-0.33 overlap, 0.34-0.39 are free
    digits = [str(d) for d in range(10)]
    assert [digits[i] for i in rule.forbidden(text + " 0.3", range(10), digits)] == ["0", "1", "2", "3"]


def test_a_plan_made_for_one_atom_answers_for_another_atom_with_the_same_coordinates_so_far():
    """The rule keeps, per coordinates written so far, what each candidate writes (its plan); the answers
    still come from each atom's own grid: a Cl at (0, 0) beside Na at the origin of the 4 A cube and beside
    Na at (0, 0, 0.5) of a 6 A cube get their own z bans, the second the same as from a fresh rule."""
    whole = [f" 0.{k:02d}" for k in range(GRID)]
    near = f"{LATTICE}\nNa 0.00 0.00 0.00\nCl 0.00 0.00"
    far = "6.0 6.0 6.0 90 90 90\nNa 0.00 0.00 0.50\nCl 0.00 0.00"
    rule = SeparationRule(0.5)
    assert set(rule.forbidden(near, range(GRID), whole)) == {k for k in range(GRID) if not 34 <= k <= 66}
    reused = rule.forbidden(far, range(GRID), whole)
    assert reused == SeparationRule(0.5).forbidden(far, range(GRID), whole)
    # Na-Cl needs 1.34 A: z within 0.22 of 0.50 is taken
    assert set(reused) == {k for k in range(GRID) if abs(k - 50) < 23}


def test_y_is_never_chosen_where_no_z_is_free():
    """A 2 A high cell: Cl at x = 0 next to Na at the origin is taken at every z for y near 0 (and near 1, by
    periodicity); those y are forbidden, whole or by their first digit, and the rest (where some z is free)
    are allowed."""
    rule = SeparationRule(0.5)
    lattice = Lattice.from_parameters(4.0, 4.0, 2.0, 90, 90, 90)
    text = "4.0 4.0 2.0 90 90 90\nNa 0.00 0.00 0.00\nCl"
    assert rule.watches(text) and rule.watches(text + " ") and rule.watches(text + " 0.00")
    blocked = {
        k
        for k in range(GRID)
        if not brute_force_free(lattice, [[0, 0, 0]], ["Na"], "Cl", 0.0, k / GRID).any()
    }
    assert 0 in blocked and 50 not in blocked  # the case is what the test means it to be
    whole = [f" 0.{k:02d}" for k in range(GRID)]
    assert set(rule.forbidden(text + " 0.00", range(GRID), whole)) == blocked
    tenths = [str(d) for d in range(10)]
    assert {int(tenths[i]) for i in rule.forbidden(text + " 0.00 0.", range(10), tenths)} == {
        d for d in range(10) if set(range(10 * d, 10 * d + 10)) <= blocked
    }
    # a token that finishes x and y at once is tested on both; one that only finishes x, on x alone (at
    # x = 0 some (y, z) is free)
    assert rule.forbidden(text + " 0.0", [0, 1], ["0 0.00", "0"]) == [0]


def test_x_is_never_chosen_where_no_y_and_z_are_free():
    """A cell 1.5 A across y and z, 4 A along x: Cl near Cs at the origin is taken at every (y, z) of the
    planes with x near 0 and 1; those x are forbidden, whole or by their first digit, and where some (y, z)
    of a plane is free its x stays allowed. Checked against pymatgen at the plane's farthest point."""
    rule = SeparationRule(0.5)
    lattice = Lattice.from_parameters(4.0, 1.5, 1.5, 90, 90, 90)
    text = "4.0 1.5 1.5 90 90 90\nCs 0.00 0.00 0.00\nCl "
    threshold = 0.5 * (covalent_radii[atomic_numbers["Cs"]] + covalent_radii[atomic_numbers["Cl"]])
    planes = free_grid(lattice.matrix, np.zeros((1, 3)), np.array([threshold]))
    blocked = {k for k in range(GRID) if not planes[k].any()}
    assert 0 in blocked and 50 not in blocked and 99 in blocked  # the case is what the test means it to be
    for k in (min(blocked, key=lambda k: abs(k - 50)), 50):  # the plane's farthest point from the Cs line
        distance = lattice.get_distance_and_image([k / GRID, 0.5, 0.5], [0, 0, 0])[0]
        assert (distance > threshold) == (k not in blocked), k
    whole = [f"0.{k:02d}" for k in range(GRID)]
    assert set(rule.forbidden(text, range(GRID), whole)) == blocked
    tenths = [f"0.{d}" for d in range(10)]
    assert {int(tenths[i][-1]) for i in rule.forbidden(text, range(10), tenths)} == {
        d for d in range(10) if set(range(10 * d, 10 * d + 10)) <= blocked
    }
    assert rule.forbidden(text, [0], ["0."]) == []  # some x is still free
    # a token that writes x and begins y is tested on the box it leaves
    free_y = int(np.flatnonzero(planes[50].any(axis=1))[0])
    assert rule.forbidden(text, [0, 1], [f"0.50 0.{free_y:02d}", "0.00 0.50"]) == [1]
    # a crystal tokenizer's whole coordinate right after the element (no space token between) is x as well,
    # and so is an element token that carries its x; a token that ends the previous atom and begins this one
    # is tested against that atom too
    assert set(rule.forbidden(text[:-1], range(GRID), [f" {w}" for w in whole])) == blocked
    bare = text[: text.index("Cs") + 2]  # "...\nCs", its coordinates still to come
    assert rule.forbidden(f"{bare} 0.00 0.00 0.0", [0, 1], ["0\nCl 0.00", "0\nCl 0.50"]) == [0]
    assert rule.forbidden(f"{bare} 0.00 0.00 0.00\n", [0, 1], ["Cl 0.00", "Cl 0.50"]) == [0]


def test_nothing_is_restricted_before_a_second_atom_or_when_nothing_is_free():
    rule = SeparationRule(0.5)
    whole = [f" 0.{k:02d}" for k in range(GRID)]
    assert not rule.watches(f"{LATTICE}\nNa 0.00 0.00")  # the first atom has nothing to keep away from
    assert not rule.watches(f"{LATTICE[:-1]}")  # nor has the lattice
    crowded = "1.5 1.5 1.5 90 90 90\nCs 0.00 0.00 0.00\nCs"  # Cs-Cs 2.44 A > any distance in 1.5 A
    assert rule.forbidden(crowded + " ", range(GRID), [w.strip() for w in whole]) == []
    crowded += " 0.50"
    assert rule.forbidden(crowded, range(GRID), whole) == []
    assert rule.forbidden(crowded + " 0.50", range(GRID), whole) == []
    with pytest.raises(ValueError, match="> 0"):
        SeparationRule(0.0)


FORMULAS = ["NaCl", "SiO2", "BaTiO3", "Li2O"]
SPECS = [structure_grammar("formula", f, layout="lines", max_atoms=12) for f in FORMULAS]


def sample_four_formulas(model, tokenizer, token_rule):
    """4 samples for each of FORMULAS under their formula grammars (and `token_rule`, None for none): the
    rollout and the parsed structures."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f}], add_generation_prompt=True, tokenize=False
        )
        for f in FORMULAS
    ]
    generator = HFGenerator(model, tokenizer, batch_size=16, token_rule=token_rule)
    rollout = generator.generate(prompts, 4, SamplingConfig(max_new_tokens=120, seed=3), SPECS)
    return rollout, [parse_structure(text) for text in decode_responses(tokenizer, rollout)]


def assert_replays_as_sampled(model, tokenizer, token_rule, rollout):
    """The masks replayed from a rollout's tokens are those applied while sampling it."""
    constraint = GrammarConstraint(tokenizer, output_vocab_size(model), rule=token_rule)
    row_specs = [spec for spec in SPECS for _ in range(4)]
    replayed = constraint.replay(row_specs, rollout.response_ids, rollout.response_mask)
    inside = rollout.response_mask.bool()
    assert torch.equal(replayed.allowed()[inside], rollout.masks.allowed()[inside])


def test_sampling_under_the_rule_passes_the_validity_rule_and_replays(crystal_model):  # noqa: F811
    """An untrained model under `formula`: with the rule every sample keeps its atoms apart (where its x left
    a free (y, z)), more samples pass the covalent rule than without it, and the masks replayed from the
    tokens are those applied while sampling; a response that breaks the rule does not replay."""
    model, tokenizer = crystal_model
    rule = SeparationRule(0.5)
    valid = {}
    for name, token_rule in (("without", None), ("with", rule)):
        rollout, structures = sample_four_formulas(model, tokenizer, token_rule)
        valid[name] = sum(bool(check_structure_covalent(s)) for s in structures)
    assert valid["with"] >= max(valid["without"] + 1, 14), valid
    assert_replays_as_sampled(model, tokenizer, rule, rollout)

    overlapping = (
        f"{LATTICE}\nNa 0.00 0.00 0.00\nCl 0.00 0.00 0.00"  # the grammar allows it, the rule does not
    )
    ids = tokenizer(overlapping, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    grammar = structure_grammar("formula", "NaCl", layout="lines")
    GrammarConstraint(tokenizer, output_vocab_size(model)).replay(
        [grammar], torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    )
    with pytest.raises(ConstraintError, match="row 0"):
        GrammarConstraint(tokenizer, output_vocab_size(model), rule=rule).replay(
            [grammar], torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        )


def test_the_rules_are_refused_with_a_vllm_generator_and_named_in_the_sample_records():
    """vLLM runs the grammar alone, so its samples could break a rule at replay: a one-line refusal."""
    from crystals.cell_volume import CellVolumeRule
    from grpo.generation import GeneratorConfig, build_generator
    from pipeline.config import PipelineError, RunConfig
    from pipeline.runs import constraint_label, token_rule

    run = RunConfig(constraint="formula", separation=0.5)
    assert [type(r) for r in token_rule(run, GeneratorConfig(kind="hf")).rules] == [SeparationRule]
    both = RunConfig(constraint="formula", separation=0.5, volume_floor=0.9)
    assert [type(r) for r in token_rule(both, GeneratorConfig(kind="hf")).rules] == [
        CellVolumeRule,
        SeparationRule,
    ]
    three = RunConfig(constraint="formula", separation=0.5, volume_floor=0.9, volume_ceiling=150)
    cell_rule = token_rule(three, GeneratorConfig(kind="hf")).rules[0]
    assert (cell_rule.floor, cell_rule.ceiling) == (0.9, 150)
    ceiling = token_rule(RunConfig(constraint="formula", volume_ceiling=150), GeneratorConfig(kind="hf"))
    assert [(type(r), r.floor, r.ceiling) for r in ceiling.rules] == [(CellVolumeRule, 0.0, 150)]
    assert token_rule(RunConfig(constraint="none", separation=0.5), GeneratorConfig(kind="hf")) is None
    assert token_rule(RunConfig(constraint="formula"), GeneratorConfig(kind="hf")) is None
    with pytest.raises(PipelineError, match="run.separation need the hf generator"):
        token_rule(run, GeneratorConfig(kind="vllm"))
    with pytest.raises(PipelineError, match="run.volume_floor and run.separation need the hf generator"):
        token_rule(both, GeneratorConfig(kind="vllm"))
    with pytest.raises(ValueError, match="needs the hf generator"):
        build_generator(GeneratorConfig(kind="vllm"), None, None, "unused", token_rule=SeparationRule())
    assert constraint_label(run) == "formula + separation 0.5"
    assert constraint_label(both) == "formula + volume floor 0.9 + separation 0.5"
    assert constraint_label(three) == "formula + volume floor 0.9 + volume ceiling 150 + separation 0.5"
    assert constraint_label(RunConfig(constraint="formula")) == "formula"
    assert constraint_label(RunConfig(constraint="none", volume_floor=0.9)) == "none"
    with pytest.raises(ValueError, match="separation must be >= 0"):
        RunConfig(separation=-1.0)
    with pytest.raises(ValueError, match="volume_floor must be >= 0"):
        RunConfig(volume_floor=-1.0)
    with pytest.raises(ValueError, match="volume_ceiling must be >= 0"):
        RunConfig(volume_ceiling=-1.0)

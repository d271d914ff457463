"""crystals/cell_volume.py: the volume bounds hold for every prefix of every lattice the grammar writes (the
lower one for Niggli-reduced cells until the last angle is begun) and are exact once the lattice is written,
the counts a grammar states are those it accepts, the rule forbids exactly the tokens after which no cell has
room (or every cell has too much), and sampling under it (HF, formula grammar, with the separation rule)
writes cells within both bounds, with the masks replayed as sampled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice

from crystals.cell_volume import (
    CellVolumeRule,
    allowed_volume,
    largest_volume,
    needed_volume,
    smallest_box,
    sphere_volume,
)
from crystals.grammar import atom_counts, structure_grammar
from crystals.separation import SeparationRule
from grpo.constraint import TokenRules
from grpo.generation import output_vocab_size
from tests.test_constraint import crystal_model  # noqa: F401  (the fixture)
from tests.test_separation import assert_replays_as_sampled, sample_four_formulas

lengths = st.integers(10, 999).map(lambda tenths: f"{tenths / 10:.1f}")
acute, obtuse = st.integers(60, 90), st.integers(90, 119)


@st.composite
def lattices(draw) -> str:
    """Lattice lines the grammar writes: three lengths, then three acute or three obtuse angles."""
    angles = draw(st.lists(draw(st.sampled_from([acute, obtuse])), min_size=3, max_size=3))
    return " ".join([draw(lengths) for _ in range(3)] + [str(a) for a in angles])


@settings(max_examples=60, deadline=None)
@given(lattices())
def test_the_bound_holds_for_every_prefix_and_is_exact_for_the_whole_lattice(line):
    volume = Lattice.from_parameters(*(float(v) for v in line.split())).volume
    box = math.prod(float(v) for v in line.split()[:3])
    assert largest_volume(line + "\n") == pytest.approx(volume, rel=1e-9)
    assert smallest_box(line + "\n") == pytest.approx(box, rel=1e-9)
    for end in range(1, len(line) + 1):
        assert largest_volume(line[:end]) >= volume * (1 - 1e-9), line[:end]
        assert smallest_box(line[:end]) <= box * (1 + 1e-9), line[:end]


def test_the_bound_of_an_unfinished_field():
    assert largest_volume("3") == pytest.approx(39.9 * 99.9**2)  # "3" may still become 39.9
    assert largest_volume("2.0 2.0 3.") == pytest.approx(2 * 2 * 3.9)
    assert largest_volume("2.0 2.0 2.0 6") == pytest.approx(8 * math.sin(math.radians(69)))  # 60-69
    # the last angle free over its choices: the shape factor's exact maximum over 100-109
    best = max(Lattice.from_parameters(2, 2, 2, 100, 100, g).volume for g in range(100, 110))
    assert largest_volume("2.0 2.0 2.0 100 100 10") == pytest.approx(best)
    assert largest_volume("2.0 2.0 x") == math.inf  # not the grammar's text: left to it
    assert smallest_box("3") == 3.0 and smallest_box("2.0 2.") == 4.0  # "3" may stay 3.x, the others 1.0
    assert smallest_box("2.0 2.0 3.5 100 100 10") == 14.0 and smallest_box("2.0 2.0 x") == 0.0


def test_each_grammar_states_the_fewest_atoms_it_can_end_with():
    formula = atom_counts(structure_grammar("formula", "Li2O"))
    assert formula.fewest({}) == {"O": 1, "Li": 2}
    assert formula.fewest({"O": 1, "Li": 3}) == {"O": 2, "Li": 4}  # a third Li begins Z = 2
    elements = atom_counts(structure_grammar("elements", "Li2O"))
    assert elements.fewest({"Li": 3}) == {"O": 1, "Li": 3}
    assert atom_counts(structure_grammar("format")).fewest({"Na": 2}) == {"Na": 2}
    assert formula.most({}) == 18 and formula.most({"O": 5}) == 18  # Z <= 6 in 20 atoms
    assert formula.most({"O": 2, "Li": 1}) == 6  # Li has begun: the two O fixed Z = 2
    assert atom_counts(structure_grammar("formula", "Li2O", max_atoms=12)).most({}) == 12
    assert elements.most({"Li": 1, "O": 1}) == 20
    assert atom_counts(None) is None
    assert atom_counts("root ::= lattice") is None


def test_the_rule_forbids_exactly_the_lengths_and_atoms_with_no_room():
    rule = CellVolumeRule(0.9)
    spec = structure_grammar("formula", "BaTiO3", layout="lines")
    need = 0.9 * sum(n * sphere_volume(el) for el, n in {"Ba": 1, "Ti": 1, "O": 3}.items())
    assert need == pytest.approx(needed_volume("", atom_counts(spec), 0.9))
    digits = [str(d) for d in range(10)]
    assert rule.forbidden("3.0 3.0 ", range(1, 10), digits, spec) == []  # c may still reach 19.9 or more
    small = "3.0 3.0 1"  # 1.x alone is too small (9 x 1.9 < need) but 1x.x is not: only "." is forbidden
    assert 9 * 1.9 < need < 9 * 10
    assert rule.forbidden(small, range(3), [".", "0", "9"], spec) == [0]
    # the lattice written: a cell with room for Z = 1, not for Z = 2 (a second Ba)
    length = f"{(1.5 * need) ** (1 / 3):.1f}"
    assert need <= float(length) ** 3 < 2 * need
    cell = f"{length} " * 3 + "90 90 90"
    atoms = (
        cell + "\nBa 0.00 0.00 0.00\nTi 0.50 0.50 0.50\nO 0.50 0.50 0.00\nO 0.50 0.00 0.50\nO 0.00 0.50 0.50"
    )
    assert rule.forbidden(cell + "\nBa 0.00 0.00 0.00", [0, 1], ["\nTi", "\nBa"], spec) == [1]
    assert rule.forbidden(atoms, [0, 1], ["\nBa", "\n"], spec) == [0]
    assert rule.forbidden(atoms, [0], ["\nBa"], spec) == []  # never every candidate
    assert not rule.watches(cell + "\nBa 0.0", spec)  # inside x: no atom can begin
    assert rule.watches(cell + "\nBa 0.00 0.00 0.0", spec)  # inside z: the token may end it and begin one
    assert not rule.watches("3.0", None) and not rule.watches("3.0", "root ::= lattice")
    with pytest.raises(ValueError, match="one of them > 0"):
        CellVolumeRule(0.0)
    with pytest.raises(ValueError, match=">= 0"):
        CellVolumeRule(0.9, -1.0)


def test_the_ceiling_forbids_exactly_the_lengths_and_closings_with_too_much_room():
    rule = CellVolumeRule(0.0, 150.0)
    spec = structure_grammar("formula", "NaCl", layout="lines")  # Na first; Z <= 10
    assert allowed_volume("", atom_counts(spec), 150.0) == 150.0 * 20
    # a b c <= 3000: c = 30.x fits after 9.9 9.9, 31.x does not; "." keeps c = 3.x
    assert 9.9 * 9.9 * 30 <= 3000 < 9.9 * 9.9 * 31
    assert rule.forbidden("9.9 9.9 3", range(3), ["0", "1", "."], spec) == [1]
    cell = "9.9 9.9 9.9 90 90 90"  # 970 A^3: room for Z >= 4 (8 atoms), not fewer
    one = cell + "\nNa 0.00 0.00 0.00"
    assert rule.forbidden(one, [0, 1], ["\nCl", "\nNa"], spec) == [0]  # Cl would close Z = 1
    four = one + "\nNa 0.50 0.50 0.00\nNa 0.50 0.00 0.50\nNa 0.00 0.50 0.50"
    assert rule.forbidden(four, [0, 1], ["\nCl", "\nNa"], spec) == []
    assert rule.forbidden(one, [0], ["\nCl"], spec) == []  # never every candidate
    assert rule.forbidden("99.9 99.9 99.9 90 90 90\nNa 0.00 0.00 0.00", [0], ["\nCl"], spec) == []
    both = CellVolumeRule(0.9, 150.0)  # each bound as alone
    assert both.forbidden(one, [0, 1], ["\nCl", "\nNa"], spec) == [0]
    assert both.forbidden("2.0 2.0 1", range(3), [".", "0", "9"], spec) == [0]  # 2 x 2 x 1.9 < 0.9 x 23.6


def test_a_cell_already_too_small_is_left_alone():
    rule = CellVolumeRule(0.9)
    spec = structure_grammar("formula", "BaTiO3", layout="lines")
    assert rule.forbidden("1.0 1.0 1.0 9", range(2), ["0", "1"], spec) == []
    assert rule.forbidden("1.0 1.0 1.0 90 90 90\nBa 0.00 0.00 0.00", [0], ["\nTi"], spec) == []


def test_sampling_under_both_rules_writes_roomy_cells_and_replays(crystal_model, request):  # noqa: F811
    """An untrained model pushed to write lengths of 1.x and 2.x A, under `formula`: without the floor many
    cells are smaller than it, with it none, and the masks replayed from the tokens (both rules chained) are
    those applied while sampling."""
    model, tokenizer = crystal_model
    short = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() in ("1", "2", "1.", "2.")]
    bias = torch.zeros(output_vocab_size(model))
    bias[short] = 10.0
    bias[tokenizer.convert_tokens_to_ids(".")] = 14.0  # after one digit
    hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias)
    request.addfinalizer(hook.remove)
    rules = TokenRules([CellVolumeRule(0.9), SeparationRule(0.5)])
    below = {}
    for name, token_rule in (("without", None), ("with", rules)):
        rollout, structures = sample_four_formulas(model, tokenizer, token_rule)
        ratios = [
            s.volume / sum(sphere_volume(site.specie.symbol) for site in s)
            for s in structures
            if s is not None
        ]
        assert len(ratios) == len(structures)
        below[name] = int(np.sum(np.array(ratios) < 0.9))
    assert below["with"] == 0 and below["without"] >= 4, below
    assert_replays_as_sampled(model, tokenizer, rules, rollout)


def test_sampling_under_the_ceiling_writes_no_huge_cell_and_replays(crystal_model, request):  # noqa: F811
    """The same model pushed to write lengths of 9x.x A: without the ceiling most cells are roomier than
    150 A^3 per atom, with it none (not even its box), and the replayed masks are those applied."""
    model, tokenizer = crystal_model
    nines = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() in ("9", "99", "9.", "99.")]
    bias = torch.zeros(output_vocab_size(model))
    bias[nines] = 12.0
    hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: out + bias)
    request.addfinalizer(hook.remove)
    rule = CellVolumeRule(0.0, 150.0)
    roomiest = {}
    for name, token_rule in (("without", None), ("with", rule)):
        rollout, structures = sample_four_formulas(model, tokenizer, token_rule)
        roomiest[name] = sorted(math.prod(s.lattice.abc) / len(s) for s in structures)
    assert roomiest["with"][-1] <= 150 and roomiest["without"][8] > 150, roomiest
    assert_replays_as_sampled(model, tokenizer, rule, rollout)


def test_chained_rules_narrow_in_order_and_each_sees_only_what_is_left():
    class Drop:
        def __init__(self, drop):
            self.drop, self.seen = drop, []

        def watches(self, text, spec=None):
            return True

        def forbidden(self, text, candidates, token_texts, spec=None):
            self.seen.append(list(candidates))
            kept = [c for c in candidates if c not in self.drop]
            return [] if not kept else [c for c in candidates if c in self.drop]

    first, second = Drop({1, 2}), Drop({0, 3})
    assert TokenRules([first, second]).forbidden("", [0, 1, 2, 3], []) == [1, 2]
    assert second.seen == [[0, 3]]  # it would empty the set: it forbids nothing

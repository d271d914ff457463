"""Within-group duplicate penalty and novelty against training structures."""

from __future__ import annotations

import pytest
from pymatgen.core import Structure

from crystals.sample import Sample
from rewards.diversity import DiversityReward, NoveltyReward
from tests.reward_structures import rocksalt, zincblende


def group(formula: str, structures: list[Structure | None]) -> list[Sample]:
    return [
        Sample(formula, frozenset({"Na", "Cl"}), "", s, None if s is not None else "bad_lattice")
        for s in structures
    ]


def test_distinct_group_scores_zero_and_collapsed_group_minus_one():
    reward = DiversityReward(method="exact")
    distinct = group(
        "NaCl",
        [rocksalt(5.6), zincblende(6.0, "Na", "Cl"), rocksalt(6.5).make_supercell([2, 1, 1], in_place=False)],
    )
    assert reward(distinct).rewards == [0.0, 0.0, 0.0]
    collapsed = group("NaCl", [rocksalt(5.6)] * 4)
    out = reward(collapsed)
    assert out.rewards == [-1.0] * 4 and [i["duplicates"] for i in out.infos] == [3] * 4


def test_duplicate_share_counts_within_each_formula_group_only():
    samples = group("NaCl", [rocksalt(5.6), rocksalt(5.6), zincblende(6.0, "Na", "Cl"), None]) + group(
        "KCl", [rocksalt(5.6)]
    )
    out = DiversityReward(method="exact")(samples)
    # NaCl group of 4: two copies each see 1 duplicate among 3 others; unparsed and lone samples get 0
    assert out.rewards == pytest.approx([-1 / 3, -1 / 3, 0.0, 0.0, 0.0])


def test_matcher_sees_through_cell_choice_exact_does_not():
    primitive = rocksalt(5.6).get_primitive_structure()
    conventional = rocksalt(5.6)
    samples = group("NaCl", [primitive, conventional])
    assert DiversityReward(method="matcher")(samples).rewards == [-1.0, -1.0]
    assert DiversityReward(method="exact")(samples).rewards == [0.0, 0.0]
    with pytest.raises(ValueError, match="method"):
        DiversityReward(method="fingerprint")


def test_novelty_against_training_structures():
    reward = NoveltyReward(train_structures=[rocksalt(5.6)])
    samples = group("NaCl", [rocksalt(5.64).get_primitive_structure(), zincblende(6.0, "Na", "Cl"), None])
    out = reward(samples)
    assert out.rewards == [0.0, 1.0, 0.0]
    assert [i["novel"] for i in out.infos] == [False, True, False]


def test_novelty_reads_the_training_split(mp20_dir):
    from crystals.data import iter_split

    known = next(iter_split("train", mp20_dir, limit=1)).structure
    reward = NoveltyReward(data_dir=mp20_dir)
    out = reward([Sample.from_structure(known), Sample.from_structure(zincblende(6.0, "Cs", "I"))])
    assert out.rewards == [0.0, 1.0]

"""Reward interface, adapter contract and the penalty gate (no potential involved: fast)."""

from __future__ import annotations

import math

import pytest
from pymatgen.core import Lattice, Structure

from crystals.sample import Sample
from grpo.trainer import REWARD_ERROR
from rewards.base import CrystalTextReward, FunctionReward, RewardOutput
from rewards.penalties import Penalties, PenaltyConfig, PenaltyReward, make_penalties
from tests.reward_structures import rocksalt, text_of

SPINEL_LIKE = "5.2 5.2 11.8 90 90 120 Mg 0.33 0.67 0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62"


def mgo() -> Structure:
    return rocksalt(4.3, "Mg", "O")


def test_sample_from_text_parses_or_keeps_the_reason():
    ok = Sample.from_text("MgAl2O4", SPINEL_LIKE)
    assert ok.structure is not None and ok.parse_error is None
    assert ok.elements == {"Mg", "Al", "O"}
    bad = Sample.from_text("MgO", "5.2 5.2 nope")
    assert bad.structure is None and bad.parse_error == "bad_lattice"
    big = Sample.from_text("Cu", "20 20 20 90 90 90 " + " ".join(f"Cu {i / 21:.3f} 0 0" for i in range(21)))
    assert big.structure is None and big.parse_error == "too_many_atoms"


def test_gate_parse_error_and_21_atoms_get_the_paper_penalty():
    gate = Penalties()
    reward = CrystalTextReward(PenaltyReward(gate))
    atoms21 = "30 30 30 90 90 90 " + " ".join(f"Cu {i / 21:.4f} {i % 3 / 3:.4f} 0.5" for i in range(21))
    atoms20 = "30 30 30 90 90 90 " + " ".join(f"Cu {i / 20:.4f} {i % 3 / 3:.4f} 0.5" for i in range(20))
    rewards, infos = reward([{"formula": "Cu"}] * 4, ["", "not a crystal", atoms21, atoms20])
    assert rewards == [-0.1, -0.1, -0.1, 0.0]
    assert [i["penalty"] for i in infos] == [
        "parse_error:empty",
        "parse_error:bad_lattice",
        "too_many_atoms",
        None,
    ]
    # a structure built directly (not parsed) is counted by the gate too
    assert (
        gate.check(Sample.from_structure(mgo().make_supercell([3, 2, 2], in_place=False))) == "too_many_atoms"
    )


def test_species_gate_compares_element_sets_not_ratios():
    gate = Penalties(PenaltyConfig(check_species=True, species_mismatch=-0.3))
    crystal = mgo()
    assert gate.check(Sample.from_structure(crystal, formula="MgO2")) is None  # ratio changed: allowed
    assert gate.check(Sample.from_structure(crystal, formula="CaO")) == "species_mismatch"
    assert gate.check(Sample.from_structure(crystal, formula="MgAl2O4")) == "species_mismatch"  # Al dropped
    assert gate.value("species_mismatch") == -0.3
    assert Penalties().check(Sample.from_structure(crystal, formula="CaO")) is None  # off by default


def test_overlap_rules_are_configurable():
    # Fe-Fe at 1.2 A: below 0.5 * (1.32 + 1.32) A (covalent rule) but above 0.5 A (CDVAE rule)
    close = Structure(Lattice.cubic(6.0), ["Fe", "Fe"], [[0, 0, 0], [0.2, 0, 0]])
    very_close = Structure(Lattice.cubic(6.0), ["Fe", "Fe"], [[0, 0, 0], [0.05, 0, 0]])  # 0.3 A
    covalent, cdvae = Penalties(), Penalties(PenaltyConfig(overlap_rule="cdvae"))
    off = Penalties(PenaltyConfig(overlap_rule="none"))
    assert covalent.check(Sample.from_structure(close)) == "overlap"
    assert cdvae.check(Sample.from_structure(close)) is None
    assert cdvae.check(Sample.from_structure(very_close)) == "overlap"
    assert off.check(Sample.from_structure(very_close)) is None
    assert covalent.check(Sample.from_structure(mgo())) is None
    with pytest.raises(ValueError, match="overlap_rule"):
        Penalties(PenaltyConfig(overlap_rule="vdw"))


def test_overlap_slope_grades_an_overlap_by_its_depth_and_stays_below_clean_samples():
    """Fe-Fe threshold 0.5 x (1.32 + 1.32) = 1.32 A: pairs at 1.2, 0.6 and 0 A sit 9 %, 55 % and 100 % inside
    it. With slope 4 the penalty -5 grows to -5 - 4 x depth; flat (slope 0) every overlap is -5."""

    def fe_pair(distance: float) -> Sample:
        return Sample.from_structure(
            Structure(Lattice.cubic(6.0), ["Fe", "Fe"], [[0, 0, 0], [distance / 6, 0, 0]])
        )

    graded = Penalties(PenaltyConfig.uniform(-9.0, overlap=-5.0, overlap_slope=4.0))
    samples = [fe_pair(d) for d in (1.2, 0.6, 0.0)]
    assert [graded.check(s) for s in samples] == ["overlap"] * 3
    values = [graded.value("overlap", s) for s in samples]
    threshold = 0.5 * 2 * 1.32
    expected = [-5.0 - 4.0 * (1 - d / threshold) for d in (1.2, 0.6)] + [-9.0]
    assert values == pytest.approx(expected, abs=0.02)  # the radii table's own decimals
    assert values[0] > values[1] > values[2] and max(values) < -5.0
    assert {Penalties(PenaltyConfig(overlap=-5.0)).value("overlap", s) for s in samples} == {-5.0}
    cdvae = Penalties(PenaltyConfig.uniform(-2.0, overlap_rule="cdvae", overlap=-1.0, overlap_slope=1.0))
    assert cdvae.value("overlap", fe_pair(0.3)) == pytest.approx(-1.0 - (1 - 0.3 / 0.5))
    # a failure (or any other penalty) that paid more than the deepest overlap would be the model's way out
    with pytest.raises(
        ValueError, match=r"\['parse_error', 'too_many_atoms', 'species_mismatch', 'failure'\]"
    ):
        Penalties(PenaltyConfig.uniform(-5.0, overlap_slope=4.0))
    # the reward a penalised sample gets through the adapter is the graded one
    rewards, infos = CrystalTextReward(PenaltyReward(graded))(
        [{"formula": "Fe"}] * 2, ["6 6 6 90 90 90 Fe 0 0 0 Fe 0.1 0 0", "6 6 6 90 90 90 Fe 0 0 0 Fe 0.05 0 0"]
    )
    assert rewards[0] > rewards[1] and [i["penalty"] for i in infos] == ["overlap", "overlap"]


def test_penalty_values_uniform_and_overrides():
    cfg = PenaltyConfig.uniform(-1.0, check_species=True)
    assert {cfg.parse_error, cfg.too_many_atoms, cfg.species_mismatch, cfg.overlap, cfg.failure} == {-1.0}
    gate = make_penalties({"penalty": -2.0, "overlap": -5.0}, default=PenaltyConfig(check_species=True))
    assert (
        gate.config.check_species
        and gate.value("parse_error:empty") == -2.0
        and gate.value("overlap") == -5.0
    )
    assert gate.value("failure:timeout") == -2.0
    with pytest.raises(TypeError, match="unknown penalty options"):
        make_penalties({"overlapp": -1.0})
    with pytest.raises(ValueError, match="unknown penalty reason"):
        gate.value("bogus")


def test_adapter_contract_one_finite_reward_and_info_per_text():
    def volume_per_atom(sample: Sample) -> tuple[float, dict]:
        return sample.structure.volume / len(sample.structure), {"natoms": len(sample.structure)}

    reward = CrystalTextReward(FunctionReward(volume_per_atom))
    texts = [SPINEL_LIKE, text_of(mgo())]
    rewards, infos = reward(
        [{"formula": "MgAl2O4", "elements": ["Mg", "Al", "O"]}, {"formula": "MgO"}], texts
    )
    assert len(rewards) == len(infos) == 2 and all(math.isfinite(r) for r in rewards)
    assert rewards[1] == pytest.approx(mgo().volume / 8, rel=1e-3)
    for info, r in zip(infos, rewards, strict=True):
        assert (
            info["reward"] == r and info["penalty"] is None and info["parse_s"] >= 0 and info["reward_s"] >= 0
        )
    assert infos[0]["natoms"] == 4
    # the same contract for samples built from structures (files, evaluation): no parse step
    again, again_infos = reward.score_samples([Sample.from_structure(mgo())])
    assert again == [pytest.approx(rewards[1], rel=1e-3)] and again_infos[0]["parse_s"] == 0.0
    with pytest.raises(ValueError, match="metas"):
        reward([{"formula": "MgO"}], texts)
    with pytest.raises(KeyError, match="formula"):
        reward([{}], texts[:1])


def test_adapter_isolates_exceptions_and_nonfinite_rewards_per_sample(caplog):
    def fragile(sample: Sample) -> float:
        if sample.structure is None:
            raise RuntimeError("no structure")  # a reward that forgot parse errors
        return math.nan if "Al" in sample.elements else 1.0

    reward = CrystalTextReward(FunctionReward(fragile), failure_penalty=-0.5)
    metas = [{"formula": "MgO"}, {"formula": "MgAl2O4"}, {"formula": "MgO"}]
    rewards, infos = reward(metas, [text_of(mgo()), SPINEL_LIKE, "garbage"])
    assert rewards == [1.0, -0.5, -0.5]
    assert [i["penalty"] for i in infos] == [None, "nonfinite_reward", "reward_error:RuntimeError"]
    assert reward.counts == {"nonfinite_reward": 1, "reward_error:RuntimeError": 1}
    assert "no structure" in infos[2]["error"]
    assert infos[2]["penalty"].startswith(f"{REWARD_ERROR}:")  # what the trainer counts as a failed sample
    assert any("retrying one by one" in r.message for r in caplog.records)
    reward(metas[:1], ["garbage"])
    assert reward.counts["reward_error:RuntimeError"] == 2  # counts accumulate over calls


def test_adapter_failure_penalty_defaults_to_the_rewards_own():
    assert CrystalTextReward(PenaltyReward(PenaltyConfig(failure=-0.7))).failure_penalty == -0.7
    assert CrystalTextReward(FunctionReward(lambda s: 0.0)).failure_penalty == -0.1


def test_reward_output_checks_lengths():
    assert RewardOutput([1.0, 2.0]).infos == [{}, {}]
    with pytest.raises(ValueError):
        RewardOutput([1.0], [{}, {}])

"""Registry names, module:attr paths, option routing, and composite weighted sums."""

from __future__ import annotations

import pytest

from crystals.sample import Sample
from rewards.base import CrystalTextReward, FunctionReward, RewardOutput
from rewards.chgnet_energy import CHGNetEnergyReward
from rewards.composite import Composite
from rewards.diversity import DiversityReward
from rewards.penalties import PenaltyReward
from rewards.registry import available_rewards, resolve_reward

ROCKSALT = "5.6 5.6 5.6 90 90 90 Na 0 0 0 Na 0 0.5 0.5 Na 0.5 0 0.5 Na 0.5 0.5 0 Cl 0.5 0 0 Cl 0 0.5 0 Cl 0 0 0.5 Cl 0.5 0.5 0.5"


class ConstantReward:
    """A user's reward class, resolved as "tests.test_rewards_registry:ConstantReward"."""

    name = "constant"

    def __init__(self, value: float = 1.0):
        self.value = value

    def __call__(self, samples):
        return RewardOutput([self.value] * len(samples))


def atom_count(sample: Sample) -> float:
    """A user's per-sample function, resolved as "tests.test_rewards_registry:atom_count"."""
    return float(len(sample.structure)) if sample.structure is not None else 0.0


def test_available_rewards_lists_the_names():
    names = available_rewards()
    assert {
        "chgnet-etot",
        "ehull",
        "diversity",
        "novelty",
        "validity",
        "species",
        "sevenn-etot",
        "uma-etot",
    } <= set(names)
    assert all(isinstance(desc, str) and desc for desc in names.values())


def test_resolve_registered_names_and_options():
    etot = resolve_reward("chgnet-etot", batch_size=7, per_cell=True)
    assert isinstance(etot, CHGNetEnergyReward) and etot.potential.batch_size == 7 and etot.per_cell
    assert not etot.penalties.config.check_species
    paper = resolve_reward("chgnet-etot+species")  # the paper's reward: species kept, -0.1 penalties
    assert isinstance(paper, CHGNetEnergyReward) and paper.penalties.config.check_species
    assert paper.penalties.config.parse_error == -0.1
    assert resolve_reward("validity", penalty=-2.0).penalties.value("overlap") == -2.0
    assert resolve_reward("diversity", method="exact").method == "exact"
    # context options a CLI passes to any reward are dropped where no term takes them
    assert isinstance(resolve_reward("diversity", data_dir="/nowhere", device="cpu"), DiversityReward)


def test_resolve_ehull_composites(shared_data_dir):
    from rewards.ehull import EHullReward

    reward = resolve_reward(
        "ehull+species+diversity", data_dir=shared_data_dir, **{"diversity.method": "exact"}
    )
    assert isinstance(reward, Composite)
    (w1, ehull), (w2, diversity) = reward.terms
    assert (
        (w1, w2) == (1.0, 1.0) and isinstance(ehull, EHullReward) and isinstance(diversity, DiversityReward)
    )
    assert ehull.penalties.config.check_species and ehull.penalties.config.parse_error == -ehull.clip
    assert diversity.method == "exact"
    weighted = resolve_reward("ehull+0.1*diversity", data_dir=shared_data_dir, clip=2.0)
    assert [w for w, _ in weighted.terms] == [1.0, 0.1] and weighted.terms[0][1].clip == 2.0
    assert weighted.name == "ehull+0.1*diversity"


def test_resolve_module_attr_paths():
    constant = resolve_reward("tests.test_rewards_registry:ConstantReward", value=3.0)
    assert isinstance(constant, ConstantReward) and constant.value == 3.0
    counted = resolve_reward("tests.test_rewards_registry:atom_count")
    assert isinstance(counted, FunctionReward)
    rewards, _ = CrystalTextReward(counted)([{"formula": "NaCl"}], [ROCKSALT])
    assert rewards == [8.0]
    mixed = resolve_reward("validity+0.5*tests.test_rewards_registry:ConstantReward", value=4.0)
    assert mixed([Sample.from_text("NaCl", ROCKSALT)]).rewards == [2.0]


@pytest.mark.parametrize(
    ("spec", "options", "error", "match"),
    [
        ("etot", {}, ValueError, "unknown reward"),
        ("tests.test_rewards_registry:Missing", {}, ValueError, "no attribute"),
        ("no_such_module_xyz:Reward", {}, ValueError, "cannot import"),
        ("diversity", {"batchsize": 3}, TypeError, "not taken"),
        ("diversity", {"penalty": -1.0}, TypeError, "gated term"),
        ("diversity+species", {}, TypeError, "gated term"),
        ("species", {}, ValueError, "no reward term"),
        ("0.1**diversity", {}, ValueError, "cannot parse"),
    ],
)
def test_resolve_errors_are_clear(spec, options, error, match):
    with pytest.raises(error, match=match):
        resolve_reward(spec, **options)


def test_composite_weights_add_up():
    natoms = FunctionReward(atom_count, name="natoms")
    volume = FunctionReward(lambda s: s.structure.volume if s.structure else -1.0, name="volume")
    composite = Composite([(1.0, natoms), (0.1, volume), (-2.0, PenaltyReward())])
    samples = [Sample.from_text("NaCl", ROCKSALT), Sample.from_text("NaCl", "junk")]
    out = composite(samples)
    volume_value = samples[0].structure.volume
    assert out.rewards[0] == pytest.approx(8.0 + 0.1 * volume_value)
    assert out.rewards[1] == pytest.approx(0.0 + 0.1 * -1.0 + -2.0 * -0.1)
    assert out.infos[0]["components"] == {
        "natoms": 8.0,
        "volume": pytest.approx(volume_value),
        "penalties": 0.0,
    }
    assert out.infos[1]["penalty"] == "parse_error:bad_lattice"
    assert composite.name == "natoms+0.1*volume+-2*penalties"
    assert composite.failure_penalty == pytest.approx(-2.0 * -0.1)
    with pytest.raises(ValueError):
        Composite([])

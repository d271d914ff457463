"""The paper's future-work reward: minus the energy above the MP-20 convex hull.

    reward = -min(E_hull, clip)   [eV/atom],   E_hull from crystals.hull.EnergyToHull

E_hull is computed for the generated (unrelaxed) structure, or after ``relax_steps`` FIRE steps when
given, or at the best of the cell volumes ``volume_scan`` lists (``rewards.potential.VolumeScan``).
Unlike -E_tot it cannot be gamed by switching to heavier elements: the competing phases' energies
move with the composition. ``clip`` bounds the worst reward so a few absurd structures do not dominate the
group's standard deviation; by default every penalty equals -clip, so a broken or rejected structure is
never better than the worst valid one (with the paper's -0.1 it would beat any E_hull > 0.1 eV/atom, and RL
would learn to emit garbage).

Same gate, guard, cache and batching as the energy reward (``rewards.potential.PotentialReward``); any
potential on the MP energy scale works (CHGNet by default). ``apply_mp2020`` follows the potential's
``energy_scale``: CHGNet energies are already MP2020-corrected, raw MP-scale energies get the correction,
and other scales (UMA/OMat24) are refused unless ``apply_mp2020`` is given explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from crystals.guard import GuardConfig
from crystals.hull import EnergyToHull
from crystals.sample import Sample
from rewards.chgnet_energy import CHGNetPotential
from rewards.penalties import Penalties, PenaltyConfig
from rewards.potential import EnergyResult, Potential, PotentialReward


class EHullReward(PotentialReward):
    """reward = -min(E_hull, clip) with E_hull (eV/atom) on the MP-20 hull; info has e_above_hull and
    e_form_per_atom."""

    name = "ehull"

    def __init__(
        self,
        potential: Potential | None = None,
        hull: EnergyToHull | None = None,
        clip: float = 1.0,
        data_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        apply_mp2020: bool | None = None,
        batch_size: int = 32,
        device: str | None = None,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
        volume_scan: Sequence[float] = (),
    ):
        potential = potential or CHGNetPotential(device=device, batch_size=batch_size)
        self.default_penalties = PenaltyConfig.uniform(-clip)  # a failure never beats a valid structure
        super().__init__(potential, penalties, guard, cache_size, relax_steps, volume_scan)
        if hull is None:
            if apply_mp2020 is None and potential.energy_scale == "other":
                raise ValueError(
                    f"{potential.name} energies (energy_scale='other') are not on the Materials Project scale, so "
                    "E_hull on the MP-20 hull would be meaningless; pass apply_mp2020=True/False to override"
                )
            apply = potential.energy_scale == "mp_uncorrected" if apply_mp2020 is None else apply_mp2020
            hull = EnergyToHull.load(data_dir, cache_dir, apply)
        self.hull = hull
        self.clip = clip

    def score(self, sample: Sample, result: EnergyResult) -> tuple[float, dict]:
        e_hull, e_form = self.hull(result.structure, result.energy_per_atom)
        return -min(e_hull, self.clip), {"e_above_hull": e_hull, "e_form_per_atom": e_form}

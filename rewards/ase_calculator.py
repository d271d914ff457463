"""Any ASE calculator as a potential, so rewards are not locked to CHGNet.

``ASEPotential(calculator)`` evaluates structures one at a time (ASE has no batch API):
``prepare`` = pymatgen -> ASE Atoms, ``predict`` = ``atoms.get_potential_energy() / len(atoms)`` (eV/atom).
``ASECalculatorReward`` = reward -E per atom (or per cell) with the same gate, guard, cache and failure
isolation as ``CHGNetEnergyReward``; ``EHullReward(potential=ASEPotential(...))`` gives E_hull.

``SevenNetEnergyReward`` and ``UMAEnergyReward`` use the ready-made calculators of ``crystals.potentials``
(SevenNet-0 on the raw MP scale, ``energy_scale="mp_uncorrected"``; UMA on the OMat24 scale, "other",
which ``EHullReward`` refuses on the MP-20 hull). The energy scale matters only for E_hull; for -E_tot any
calculator works.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from crystals.guard import GuardConfig
from crystals.potentials import EnergyScale, sevenn_calculator, uma_calculator
from rewards.penalties import Penalties, PenaltyConfig
from rewards.potential import EnergyReward


class ASEPotential:
    """An ASE calculator (or a zero-argument factory, called once on first use) as a ``Potential``."""

    batch_size = 1  # one structure per ASE call; the evaluator still isolates failures per structure

    def __init__(
        self, calculator: Any | Callable[[], Any], name: str = "ase", energy_scale: EnergyScale = "other"
    ):
        self._calculator = calculator
        self.name = name
        self.energy_scale = energy_scale

    def calculator(self) -> Any:
        if callable(self._calculator) and not hasattr(self._calculator, "get_potential_energy"):
            self._calculator = self._calculator()
        return self._calculator

    def prepare(self, structure: Structure) -> Any:
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure)

    def predict(self, atoms_list: Sequence[Any]) -> list[float]:
        calculator = self.calculator()
        energies = []
        for atoms in atoms_list:
            atoms.calc = calculator
            energies.append(float(atoms.get_potential_energy()) / len(atoms))
        return energies


class ASECalculatorReward(EnergyReward):
    """reward = -E per atom (eV/atom) from any ASE calculator; see ``EnergyReward``."""

    name = "ase-etot"

    def __init__(
        self,
        calculator: Any | Callable[[], Any],
        name: str = "ase-etot",
        energy_scale: EnergyScale = "other",
        per_cell: bool = False,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
    ):
        potential = ASEPotential(calculator, name, energy_scale)
        super().__init__(potential, per_cell, penalties, guard, cache_size, relax_steps)
        self.name = name


class SevenNetEnergyReward(ASECalculatorReward):
    """reward = -SevenNet energy per atom (eV/atom); 7net-0 predicts raw MP energies (no MP2020 corrections)."""

    def __init__(
        self,
        model: str = "7net-0",
        device: str = "cpu",
        per_cell: bool = False,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
    ):
        calculator = sevenn_calculator(model, device)
        super().__init__(
            calculator, "sevenn-etot", "mp_uncorrected", per_cell, penalties, guard, cache_size, relax_steps
        )


class UMAEnergyReward(ASECalculatorReward):
    """reward = -UMA energy per atom (eV/atom) from a local checkpoint (OMat24 scale: not for the MP hull)."""

    def __init__(
        self,
        checkpoint: str | Path,
        task_name: str = "omat",
        device: str = "cpu",
        per_cell: bool = False,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
    ):
        calculator = uma_calculator(checkpoint, task_name, device)
        super().__init__(calculator, "uma-etot", "other", per_cell, penalties, guard, cache_size, relax_steps)

"""The paper's reward: minus the CHGNet energy of the generated (unrelaxed) structure.

    reward = -E_CHGNet / N   [eV/atom]     (or -E_CHGNet [eV per cell] with per_cell=True)

Lower energy is better, hence the sign. CHGNet 0.3.0 (shipped with chgnet 0.4.x) was trained on MPtrj
energies that already include the MP2020 anion/U corrections, so its energies are on the corrected MP scale
(``energy_scale = "mp2020_corrected"``; see crystals/hull.py for the check against MP-20).

Inference is batched: graphs are built per structure (so a structure the graph converter rejects, e.g.
isolated atoms, fails alone) and then evaluated ``batch_size`` at a time with energy only (no forces, no
autograd). Guarding, caching and failure isolation come from ``rewards.potential.EnergyEvaluator``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from crystals.guard import GuardConfig
from crystals.hull import EnergyToHull
from crystals.potentials import load_chgnet
from rewards.penalties import Penalties, PenaltyConfig
from rewards.potential import EnergyReward


class CHGNetPotential:
    """CHGNet as a batched ``Potential``: ``prepare`` = graph conversion, ``predict`` = energies (eV/atom)."""

    energy_scale = "mp2020_corrected"

    def __init__(
        self, model_name: str = "0.3.0", device: str | None = None, batch_size: int = 32, model=None
    ):
        self.model = load_chgnet(model_name, device) if model is None else model
        self.device = device
        self.batch_size = batch_size
        self.name = f"chgnet-{model_name}"

    def prepare(self, structure: Structure) -> Any:
        # The model is shared in-process (load_chgnet), and CHGNet's ASE calculator switches its converter to
        # "warn" on isolated atoms; the reward needs them to fail (free-atom energies are an RL exploit).
        self.model.graph_converter.set_isolated_atom_response("error")
        return self.model.graph_converter(structure)

    def predict(self, graphs: Sequence[Any]) -> list[float]:
        import torch

        with torch.no_grad():  # energies only: no force/stress graph to keep
            preds = self.model.predict_graph(list(graphs), task="e", batch_size=self.batch_size)
        preds = [preds] if isinstance(preds, dict) else preds
        return [float(p["e"]) for p in preds]

    def calculator(self) -> Any:
        from chgnet.model.dynamics import CHGNetCalculator

        return CHGNetCalculator(model=self.model, use_device=self.device)


class CHGNetEnergyReward(EnergyReward):
    """reward = -CHGNet energy per atom (eV/atom), or per cell with ``per_cell``; gate and penalties as in
    ``PotentialReward`` (paper defaults: -0.1). With ``watch_hull`` each scored sample's info also holds its
    E_hull on the MP-20 hull (``data_dir``'s, else the packaged one), watched and never rewarded."""

    name = "chgnet-etot"

    def __init__(
        self,
        batch_size: int = 32,
        device: str | None = None,
        model_name: str = "0.3.0",
        per_cell: bool = False,
        potential: CHGNetPotential | None = None,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
        watch_hull: bool = True,
        data_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        volume_scan: Sequence[float] = (),
    ):
        potential = potential or CHGNetPotential(model_name, device, batch_size)
        hull = EnergyToHull.load(data_dir, cache_dir, apply_mp2020=False) if watch_hull else None
        super().__init__(potential, per_cell, penalties, guard, cache_size, relax_steps, hull, volume_scan)

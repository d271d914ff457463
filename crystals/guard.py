"""The structure guard: whether a cell may be given to an ML potential at all.

``guard_structure`` rejects cells that would make the neighbour list explode or be meaningless before any
potential code runs: non-finite or ~0 volume, huge cells (isolated atoms at the cutoff), a density that
implies too many neighbours within the cutoff, or a cell so skewed that the number of periodic images to
search explodes (images ~ prod_i (2*ceil(r_cut / w_i) + 1), w_i the cell's plane spacings). The limits are
a ``GuardConfig``; its ``timeout_s`` bounds each potential call of whoever runs the potential.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Structure


@dataclass(frozen=True)
class GuardConfig:
    """Limits checked before a structure reaches a potential; ``timeout_s`` bounds each call."""

    cutoff: float = 6.0  # A, neighbour cutoff of the potential (CHGNet's atom graph: 6 A)
    max_volume_per_atom: float = 250.0  # A^3; MP-20 tops out at 202 (Li2S8); beyond, atoms sit alone
    max_neighbors_per_atom: float = 500.0  # (N/V) * 4/3 pi r_cut^3; diamond (densest MP-20 case) ~ 160
    max_images: int = 10_000  # periodic images the neighbour search visits; MP-20 cells need < 500
    timeout_s: float | None = 60.0


def plane_spacings(matrix: np.ndarray) -> np.ndarray:
    """w_i = V / |a_j x a_k|: the cell's width along each axis i, across the planes of the other two (rows of
    `matrix` are the lattice vectors). A point within r of a site lies within r / w_i of it in fractional
    coordinate i, so a search to distance r visits ceil(r / w_i) periodic images each way along i."""
    areas = np.linalg.norm(np.cross(matrix[[1, 2, 0]], matrix[[2, 0, 1]]), axis=1)
    return abs(float(np.linalg.det(matrix))) / areas


def guard_structure(structure: Structure, config: GuardConfig) -> str | None:
    """Why this cell cannot be given to a potential (None when it can)."""
    matrix = structure.lattice.matrix
    if not np.all(np.isfinite(matrix)) or not np.all(np.isfinite(structure.frac_coords)):
        return "nonfinite_cell"
    volume = abs(float(np.linalg.det(matrix)))
    if volume < 1e-6:
        return "zero_volume"
    n_atoms = len(structure)
    if volume / n_atoms > config.max_volume_per_atom:
        return "huge_cell"
    if n_atoms / volume * 4 / 3 * math.pi * config.cutoff**3 > config.max_neighbors_per_atom:
        return "too_many_neighbors"
    reach = np.ceil(config.cutoff / plane_spacings(matrix))  # images visited each way along each axis
    if float(np.prod(2 * reach + 1)) > config.max_images:
        return "too_many_images"
    return None

"""Atoms kept apart while a model writes them: the token rule that no grammar can state.

A grammar (``crystals.grammar``) fixes the composition and the number format, not where atoms sit, and a small
model's commonest failure is an atom written on top of an earlier one (a non-finite energy, a relaxation that
never starts). ``SeparationRule`` forbids, while sampling, the tokens that would finish the z coordinate of an
atom closer than ``scale * (r_i + r_j)`` (covalent radii; 0.5 is the validity rule of the paper, section 5.3,
``crystals.validity.check_structure_covalent``) to an earlier atom of the same cell, periodic images included.

It reads the response text so far, which the grammar has made well formed: six lattice numbers, then atoms as
``El x y z`` with coordinates ``0.dd`` (whitespace between fields, newline or space between atoms). Only z is
restricted: once x and y are written, every z on the 0.01 grid is tested at once. A token that leaves z
unfinished (``" 0."``) stays allowed while some completion is free. When no z is free for the chosen (x, y)
the rule forbids nothing and the sample overlaps as it would have (the reward's overlap penalty then counts
it). The rule is a pure function of the text, so sampling and re-scoring (``grpo.constraint``) give the same
masks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Lattice

GRID = 100  # coordinates are written 0.00-0.99 (crystals.grammar)
_Z_PREFIX = re.compile(r"0(\.\d{0,2})?")


def free_heights(
    matrix: np.ndarray, sites: np.ndarray, thresholds: np.ndarray, x: float, y: float
) -> np.ndarray:
    """bool [GRID]: for each z = k / GRID, whether an atom at (x, y, z) keeps every distance to the earlier
    `sites` (fractional, [n, 3]) above its threshold ([n], A), over every periodic image that could be nearer.

    Images: with the difference wrapped into [-0.5, 0.5), image n along axis i is at least
    |d_i + n| * w_i away (w_i: the cell's width across the planes of the other two axes), so |n| <=
    ceil(t / w_i + 0.5) covers every image within the largest threshold t."""
    volume = abs(np.linalg.det(matrix))
    widths = np.array(
        [volume / np.linalg.norm(np.cross(matrix[j], matrix[k])) for j, k in ((1, 2), (2, 0), (0, 1))]
    )
    reach = [int(math.ceil(thresholds.max() / w + 0.5)) for w in widths]
    images = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    heights = np.arange(GRID) / GRID
    points = np.stack([np.full(GRID, x), np.full(GRID, y), heights], axis=1)  # [G, 3]
    delta = points[:, None, :] - sites[None, :, :]  # [G, n, 3]
    delta -= np.round(delta)
    cartesian = (delta[:, :, None, :] + images[None, None, :, :]) @ matrix  # [G, n, I, 3]
    distance = np.linalg.norm(cartesian, axis=-1).min(axis=-1)  # [G, n]
    return (distance > thresholds[None, :]).all(axis=1)


class SeparationRule:
    """grpo.constraint's token rule for crystal text: no atom within ``scale * (r_i + r_j)`` of an earlier one
    (see the module docstring)."""

    def __init__(self, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"the separation scale must be > 0, got {scale!r}")
        self.scale = scale

    @staticmethod
    def _state(text: str) -> tuple[list[str], str] | None:
        """(complete fields, the unfinished last field) when the text is inside an atom with its x written
        after at least one earlier atom; else None (nothing to restrict yet)."""
        fields = text.split()
        partial = "" if not text or text[-1].isspace() else fields.pop()
        atoms = len(fields) - 6
        if atoms < 4 + 2 or atoms % 4 < 2:  # the lattice, one atom, then an element and its x
            return None
        return fields, partial

    def watches(self, text: str) -> bool:
        """Whether the next token may settle a z this rule tests (the current atom's x is written)."""
        return self._state(text) is not None

    def forbidden(self, text: str, candidates: Sequence[int], token_texts: Sequence[str]) -> list[int]:
        """The candidates that would finish (or leave only overlapping completions of) the current atom's z."""
        state = self._state(text)
        if state is None:
            return []
        fields, partial = state
        try:
            matrix = Lattice.from_parameters(*(float(v) for v in fields[:6])).matrix
            atoms = fields[6:]
            done = len(atoms) // 4 * 4
            sites = np.array([[float(v) for v in atoms[i + 1 : i + 4]] for i in range(0, done, 4)])
            radii = covalent_radii[[atomic_numbers[atoms[i]] for i in range(0, done, 4)]]
            element, x = atoms[done], float(atoms[done + 1])
            thresholds = self.scale * (radii + covalent_radii[atomic_numbers[element]])
            written_y = atoms[done + 2] if len(atoms) - done == 3 else None
        except (ValueError, KeyError, IndexError):  # not the text the grammar writes: leave it to the grammar
            return []
        free: dict[float, np.ndarray] = {}
        forbidden = []
        for token in candidates:
            y_text, z_text = self._coordinates(written_y, partial, token_texts[token])
            if z_text is None or _Z_PREFIX.fullmatch(z_text) is None:
                continue
            try:
                y = float(y_text)
            except ValueError:
                continue
            if y not in free:
                free[y] = free_heights(matrix, sites, thresholds, x, y)
            heights = free[y]
            if not heights.any():  # nowhere to go: the rule gives up on this atom
                continue
            digits = z_text[2:]
            low = int(digits.ljust(2, "0")) if digits else 0
            high = int(digits.ljust(2, "9")) if digits else GRID - 1
            if not heights[low : high + 1].any():
                forbidden.append(token)
        return forbidden

    @staticmethod
    def _coordinates(written_y: str | None, partial: str, token: str) -> tuple[str, str | None]:
        """(y, the z written so far) after appending `token`; z None while it has not started."""
        pieces = (partial + token).split()
        if written_y is not None:  # y is complete: the partial field (maybe empty) and the token begin z
            return written_y, pieces[0] if pieces else None
        if len(pieces) < 2:  # still inside y, or y just ended: z has not started
            return "", None
        return pieces[0], pieces[1]

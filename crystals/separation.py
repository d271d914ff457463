"""Atoms kept apart while a model writes them: the token rule that no grammar can state.

A grammar (``crystals.grammar``) fixes the composition and the number format, not where atoms sit, and a small
model's commonest failure is an atom written on top of an earlier one (a non-finite energy, a relaxation that
never starts). ``SeparationRule`` forbids, while sampling, the tokens that would place an atom closer than
``scale * (r_i + r_j)`` (covalent radii; 0.5 is the validity rule of the paper, section 5.3,
``crystals.validity.check_structure_covalent``) to an earlier atom of the same cell, periodic images included.

It reads the response text so far, which the grammar has made well formed: six lattice numbers, then atoms as
``El x y z`` with coordinates ``0.dd`` (whitespace between fields, newline or space between atoms). x, y and
z are all steered: a token is forbidden when every grid point (x, y, z) on the 0.01 grid that the coordinates
it writes can still end at is taken, so a token that leaves a coordinate unfinished (``" 0."``) stays allowed
while some completion is free, and an x or y is never chosen where nothing after it is left. When nothing the
text so far can still end at is free (a cell already full) the rule forbids nothing and the sample overlaps as
it would have (the reward's overlap penalty then counts it). A token may carry several fields (a crystal
tokenizer has whole coordinates such as " 0.75", and " O" in the one-line layout): every atom whose
coordinates a token writes is tested, so an x written by the token right after the element is steered like
any other. The rule is a pure function of the text, so sampling and re-scoring (``grpo.constraint``) give the
same masks.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Lattice

GRID = 100  # coordinates are written 0.00-0.99 (crystals.grammar)
_PREFIX = re.compile(r"0(\.\d{0,2})?")


def free_plane(matrix: np.ndarray, sites: np.ndarray, thresholds: np.ndarray, x: float) -> np.ndarray:
    """bool [GRID, GRID]: for each (y, z) = (j, k) / GRID, whether an atom at (x, y, z) keeps every distance
    to the earlier `sites` (fractional, [n, 3]) above its threshold ([n], A), over every periodic image.

    The distance to image s + m of a site is sqrt(d G d) with d = p - s - m and G = M M^T the metric of the
    cell matrix M (rows: lattice vectors). It is at least |d_i| w_i along each axis i (w_i: the cell's width
    across the planes of the other two axes), so only the images with |d_i| <= t / w_i somewhere on the
    plane can come within t; those few are tested on the whole grid at once."""
    volume = abs(np.linalg.det(matrix))
    widths = [volume / np.linalg.norm(np.cross(matrix[j], matrix[k])) for j, k in ((1, 2), (2, 0), (0, 1))]
    metric = matrix @ matrix.T
    grid = np.arange(GRID) / GRID
    pairs = []  # (offset along x, site y + image, site z + image, threshold^2)
    for site, threshold in zip(sites, thresholds, strict=True):
        reach = [threshold / w for w in widths]
        # image m_i can come within t only if some point of the plane has |p_i - s_i - m_i| <= t / w_i
        low = [x - site[0] - reach[0], grid[0] - site[1] - reach[1], grid[0] - site[2] - reach[2]]
        high = [x - site[0] + reach[0], grid[-1] - site[1] + reach[1], grid[-1] - site[2] + reach[2]]
        images = [range(math.ceil(lo), math.floor(hi) + 1) for lo, hi in zip(low, high, strict=True)]
        for mx in images[0]:
            for my in images[1]:
                for mz in images[2]:
                    pairs.append((x - site[0] - mx, site[1] + my, site[2] + mz, threshold**2))
    free = np.ones((GRID, GRID), dtype=bool)
    for start in range(0, len(pairs), 64):  # bounded memory: 64 x GRID^2 distances at a time
        a, sy, sz, limit = (np.array(column) for column in zip(*pairs[start : start + 64], strict=True))
        b = grid[None, :] - sy[:, None]  # [P, G] along y
        c = grid[None, :] - sz[:, None]  # [P, G] along z
        along_y = 2 * metric[0, 1] * a[:, None] * b + metric[1, 1] * b**2
        along_z = 2 * metric[0, 2] * a[:, None] * c + metric[2, 2] * c**2
        squared = (
            (metric[0, 0] * a**2)[:, None, None]
            + along_y[:, :, None]
            + along_z[:, None, :]
            + 2 * metric[1, 2] * b[:, :, None] * c[:, None, :]
        )
        free &= ~(squared <= limit[:, None, None]).any(axis=0)
    return free


@functools.lru_cache(maxsize=16384)
def _free_plane_of(lattice: tuple[str, ...], atoms: tuple[str, ...], element: str, scale: float, x: int):
    """free_plane for the atom `element` at x = `x` / GRID after the written `atoms` (El x y z ...) in the
    written `lattice`; None when the text is not what the grammar writes. Cached: every step of an atom asks
    again, and steering x asks for a plane per x tried (16384 planes of 10 kB at most)."""
    try:
        matrix = Lattice.from_parameters(*(float(v) for v in lattice)).matrix
        sites = np.array([[float(v) for v in atoms[i + 1 : i + 4]] for i in range(0, len(atoms), 4)])
        radii = covalent_radii[[atomic_numbers[atoms[i]] for i in range(0, len(atoms), 4)]]
        thresholds = scale * (radii + covalent_radii[atomic_numbers[element]])
        free = free_plane(matrix, sites, thresholds, x / GRID)
    except (ValueError, KeyError, IndexError):  # leave malformed text to the grammar
        return None
    free.flags.writeable = False  # shared by every caller of the cache
    return free


def _box_is_free(atom: tuple, box: tuple[slice, slice, slice]) -> bool | None:
    """Whether some grid point of `box` (x, y, z index ranges) is free for `atom` (_free_plane_of's leading
    arguments); None for malformed text. Planes are tried in order of x and the search stops at the first
    free point, so a cell with room costs a plane or two."""
    xs, ys, zs = box
    for x in range(xs.start, xs.stop):
        free = _free_plane_of(*atom, x)
        if free is None:
            return None
        if free[ys, zs].any():
            return True
    return False


class SeparationRule:
    """grpo.constraint's token rule for crystal text: no atom within ``scale * (r_i + r_j)`` of an earlier one
    (see the module docstring)."""

    def __init__(self, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"the separation scale must be > 0, got {scale!r}")
        self.scale = scale

    @staticmethod
    def _state(text: str) -> tuple[tuple[str, ...], tuple[str, ...], list[str]] | None:
        """(lattice fields, the complete earlier atoms' fields, the current atom's fields so far, the last one
        perhaps unfinished) once the lattice is written and a token may write an atom with one before it: past
        the first atom, or inside its z (a token may end it and begin the next). None before that."""
        fields = text.split()
        complete = len(fields) - (1 if text and not text[-1].isspace() else 0)
        if complete < 6:
            return None
        atoms, written = divmod(complete - 6, 4)
        if atoms < 1 and written < 3:
            return None
        done = 6 + 4 * atoms
        return tuple(fields[:6]), tuple(fields[6:done]), fields[done:]

    def watches(self, text: str) -> bool:
        """Whether the next token may write a coordinate this rule tests (cheap: a split of the text)."""
        return self._state(text) is not None

    def forbidden(self, text: str, candidates: Sequence[int], token_texts: Sequence[str]) -> list[int]:
        """The candidates after which the text writes an atom whose every completion of (x, y, z) lands on an
        earlier atom, where the text before them left that atom a free point (else the rule gives up on it).
        A token may carry an element and its coordinates, or end one atom and begin the next: each atom the
        token writes coordinates of is tested, against the atoms complete before it."""
        state = self._state(text)
        if state is None:
            return []
        lattice, earlier, current = state
        tail = " ".join(current) + (" " if current and text[-1].isspace() else "")
        memo: dict[tuple, bool | None] = {}

        def free(atom: tuple, box: tuple[slice, slice, slice]) -> bool | None:
            key = (atom[1:3], tuple((b.start, b.stop) for b in box))  # one call: lattice and scale are fixed
            if key not in memo:
                memo[key] = _box_is_free(atom, box)
            return memo[key]

        forbidden = []
        for token in candidates:
            prior, fields = earlier, (tail + token_texts[token]).split()
            for start in range(0, len(fields), 4):
                element, coordinates = fields[start], fields[start + 1 : start + 4]
                if coordinates and prior:
                    atom = (lattice, prior, element, self.scale)
                    box = _box(coordinates)
                    # what the text before the token left this atom: its coordinates there, or the whole cell
                    before = _box(current[1:] if start == 0 and len(current) > 1 else [])
                    if box is not None and free(atom, before) and free(atom, box) is False:
                        forbidden.append(token)
                        break
                prior += tuple(fields[start : start + 4])
        return forbidden


def _box(coordinates: Sequence[str]) -> tuple[slice, slice, slice] | None:
    """The grid index ranges (x, y, z) an atom whose coordinates begin with `coordinates` may end at (fields
    past z belong to the next atom); None when one is not a coordinate the grammar writes."""
    ranges = tuple(_grid_range(c) for c in coordinates[:3])
    if None in ranges:
        return None
    return (*ranges, *[slice(0, GRID)] * (3 - len(ranges)))


def _grid_range(prefix: str) -> slice | None:
    """The grid indices a coordinate beginning with `prefix` may end at ("0." -> 0-99, "0.3" -> 30-39)."""
    if _PREFIX.fullmatch(prefix) is None:
        return None
    digits = prefix[2:]
    low = int(digits.ljust(2, "0")) if digits else 0
    high = int(digits.ljust(2, "9")) if digits else GRID - 1
    return slice(low, high + 1)

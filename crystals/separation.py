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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, covalent_radii
from pymatgen.core import Lattice

from crystals.guard import plane_spacings

GRID = 100  # coordinates are written 0.00-0.99 (crystals.grammar)
_PREFIX = re.compile(r"0(\.\d{0,2})?")


def free_grid(
    matrix: np.ndarray, sites: np.ndarray, thresholds: np.ndarray, free: np.ndarray | None = None
) -> np.ndarray:
    """bool [GRID, GRID, GRID]: for each grid point (i, j, k) / GRID, whether an atom there keeps every distance
    to the earlier `sites` (fractional, [n, 3]) above its threshold ([n], A), over every periodic image; with
    `free`, the points it leaves free that also keep away from `sites` (it is not changed).

    The distance to image s - m of a site is sqrt(d G d) with d = p - s + m and G = M M^T the metric of the
    cell matrix M (rows: lattice vectors). It is at least |d_i| w_i along each axis i (w_i: the cell's width
    across the planes of the other two axes), so an image can only block the grid points within t / w_i of it
    along every axis: each image is tested on that box alone, which is why a whole grid costs ~10-20 ms for
    20 atoms (a plane at a time cost ~1.5 ms per plane, 100 planes per atom)."""
    return _narrowed(_geometry(matrix), sites, thresholds, free)


def _geometry(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A cell's widths across its planes (crystals.guard.plane_spacings) and its metric M M^T."""
    return plane_spacings(matrix), matrix @ matrix.T


@functools.lru_cache(maxsize=1024)  # every atom of a row asks for its lattice's
def _lattice_geometry(lattice: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _geometry(Lattice.from_parameters(*(float(v) for v in lattice)).matrix)


def _narrowed(
    geometry: tuple[np.ndarray, np.ndarray],
    sites: np.ndarray,
    thresholds: np.ndarray,
    free: np.ndarray | None = None,
) -> np.ndarray:
    """free_grid with the cell's `_geometry`."""
    widths, metric = geometry
    free = np.ones((GRID, GRID, GRID), dtype=bool) if free is None else free.copy()
    for site, threshold in zip(sites, thresholds, strict=True):
        spans = [_image_spans(site[i], threshold / widths[i]) for i in range(3)]
        for ix, a in spans[0]:
            for iy, b in spans[1]:
                # d G d = ab + c (slope + G_zz c), ab and slope over the (x, y) box: two passes over the box
                ab = (metric[0, 0] * a**2)[:, None] + 2 * metric[0, 1] * a[:, None] * b + metric[1, 1] * b**2
                slope = 2 * (metric[0, 2] * a[:, None] + metric[1, 2] * b)
                for iz, c in spans[2]:
                    squared = slope[:, :, None] * c
                    squared += ab[:, :, None]
                    squared += metric[2, 2] * c**2
                    free[ix[0] : ix[-1] + 1, iy[0] : iy[-1] + 1, iz[0] : iz[-1] + 1] &= squared > threshold**2
    return free


def _image_spans(position: float, reach: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Along one axis, for each periodic image position - m of a coordinate whose reach meets the cell: the grid
    indices within `reach` of it and their offsets from it."""
    spans = []
    for m in range(math.floor(position - reach), math.floor(position + reach) + 1):
        low = max(0, math.ceil((position - reach - m) * GRID))
        high = min(GRID, math.floor((position + reach - m) * GRID) + 1)
        if low < high:
            index = np.arange(low, high)
            spans.append((index, index / GRID - position + m))
    return spans


class _FreeGrid:
    """The free points of one atom's grid. Every candidate token asks for a box of it, and the boxes of one
    step differ only along the coordinate being written: along that line, running counts of free points (one
    per line the atom's tokens reach, built as first asked) answer each box in O(1), and a step's candidates
    on one line all at once."""

    def __init__(self, points: np.ndarray):
        points.flags.writeable = False  # shared by every caller of the cache
        self.points = points  # bool [GRID, GRID, GRID]
        self.planes = points.any(axis=(1, 2))  # bool [GRID]: whether the plane at each x has a free point
        self._running: dict[tuple[int, ...], np.ndarray] = {}

    def running(self, fixed: tuple[int, ...]) -> np.ndarray:
        """[GRID + 1]: the free points (planes, lines) before each index of the line at the `fixed` indices."""
        running = self._running.get(fixed)
        if running is None:
            line = self.planes if not fixed else self.points[fixed].reshape(GRID, -1).any(axis=1)
            running = self._running[fixed] = np.concatenate(([0], np.cumsum(line)))
        return running

    def box_has_free(self, box: tuple[tuple[int, int], ...]) -> bool:
        """Whether the box of grid index ranges [start, stop) along x, y and z holds a free point."""
        return bool(self.points[tuple(slice(*r) for r in box)].any())

    def has_free(self, coordinates: tuple[str, ...]) -> bool | None:
        """Whether some grid point an atom whose coordinates begin with `coordinates` may end at is free;
        None when they are not coordinates the grammar writes."""
        box = _box(coordinates)
        if box is None:
            return None
        line = _line_of(box)
        if line is None:  # a token that writes two unfinished coordinates at once
            return self.box_has_free(box)
        fixed, low, high = line
        running = self.running(fixed)
        return bool(running[high] > running[low])


def _line_of(box: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], int, int] | None:
    """A box as (the indices it fixes, low, high) when it runs along one line of the grid: all of x (an atom
    with no coordinate written), a range of y at one x, or a range of z at one (x, y); else None."""
    (x0, x1), (y0, y1), (z0, z1) = box
    whole_z = z1 - z0 == GRID
    if whole_z and y1 - y0 == GRID:  # along x
        return (), x0, x1
    if whole_z and x1 - x0 == 1:  # along y at one x
        return (x0,), y0, y1
    if x1 - x0 == 1 and y1 - y0 == 1:  # along z at one (x, y)
        return (x0, y0), z0, z1
    return None


@dataclass(frozen=True)
class _Plan:
    """What a step's candidates write of the current atom past its `written` complete coordinates, the same
    whatever those coordinates are (so built once per unfinished field and candidate set, not per atom): the
    boxes along one line of the grid as arrays, grouped by the line's axis and the indices the tokens fix
    (lows and highs along it), the other boxes one by one, and the tokens that write past the atom."""

    written: int
    lines: tuple[tuple[int, tuple[int, ...], np.ndarray, np.ndarray, np.ndarray], ...]
    boxes: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    beyond: tuple[int, ...]

    def blocked(self, grid: _FreeGrid, written_at: tuple[int, ...]) -> list[int]:
        """The tokens whose every completion of the atom is taken in `grid`, the written coordinates at grid
        indices `written_at`."""
        out = []
        for axis, fixed, tokens, low, high in self.lines:
            running = grid.running((written_at + fixed)[:axis])
            if axis < self.written:  # along a written coordinate (the tokens write no more of it)
                if running[written_at[axis] + 1] <= running[written_at[axis]]:
                    out += tokens.tolist()
            else:
                out += tokens[running[high] <= running[low]].tolist()
        head = tuple((i, i + 1) for i in written_at)
        for token, ranges in self.boxes:
            if not grid.box_has_free(head + ranges + ((0, GRID),) * (3 - len(head) - len(ranges))):
                out.append(token)
        return out


def _plan(written: int, unfinished: str, candidates: tuple[int, ...], token_texts: Sequence[str]) -> _Plan:
    """The plan after `written` complete coordinates and the text `unfinished` after them (a space, or a
    space and the coordinate being written)."""
    lines: dict[tuple[int, tuple[int, ...]], list[tuple[int, int, int]]] = {}
    boxes, beyond = [], []
    for token in candidates:
        fields = (unfinished + token_texts[token]).split()
        if written + len(fields) > 3:
            beyond.append(token)
            continue
        ranges = tuple(_grid_range(field) for field in fields)
        if written + len(fields) == 0 or None in ranges:  # no coordinate, or not one the grammar writes
            continue
        # the written coordinates stand in as index 0: a line's kind depends on their widths (one), not on
        # where they are
        line = _line_of(((0, 1),) * written + ranges + ((0, GRID),) * (3 - written - len(ranges)))
        if line is None:
            boxes.append((token, ranges))
        else:
            fixed, low, high = line
            lines.setdefault((len(fixed), fixed[written:]), []).append((token, low, high))
    arrays = tuple(
        (axis, fixed, *(np.array(column, dtype=np.int64) for column in zip(*members, strict=True)))
        for (axis, fixed), members in lines.items()
    )
    return _Plan(written, arrays, tuple(boxes), tuple(beyond))


_GRIDS: OrderedDict[tuple, _FreeGrid | None] = OrderedDict()
_GRIDS_KEPT = 256  # 1 MB each; a batch writes one atom per row at a time
_PLANS_KEPT = 4096  # ~111 unfinished coordinates at each of three places, a few candidate sets each


def _free_grid_of(
    lattice: tuple[str, ...], atoms: tuple[str, ...], element: str, scale: float
) -> _FreeGrid | None:
    """free_grid for the atom `element` after the written `atoms` (El x y z ...) in the written `lattice`;
    None when the text is not what the grammar writes. Cached: every token of an atom asks again. The grid
    of an atom of the same element one atom earlier, when cached, is narrowed by the one site since (atoms
    come grouped by element, so most atoms cost one site, not all those before them)."""
    key = (lattice, atoms, element, scale)
    if key in _GRIDS:
        _GRIDS.move_to_end(key)
        return _GRIDS[key]
    try:
        geometry = _lattice_geometry(lattice)
        sites = np.array([[float(v) for v in atoms[i + 1 : i + 4]] for i in range(0, len(atoms), 4)])
        radii = covalent_radii[[atomic_numbers[atoms[i]] for i in range(0, len(atoms), 4)]]
        thresholds = scale * (radii + covalent_radii[atomic_numbers[element]])
        earlier = _GRIDS.get((lattice, atoms[:-4], element, scale)) if atoms else None
        if earlier is not None:
            points = _narrowed(geometry, sites[-1:], thresholds[-1:], earlier.points)
        else:
            points = _narrowed(geometry, sites, thresholds)
    except (ValueError, KeyError, IndexError):  # leave malformed text to the grammar
        result = None
    else:
        result = _FreeGrid(points)
    _GRIDS[key] = result
    if len(_GRIDS) > _GRIDS_KEPT:
        _GRIDS.popitem(last=False)
    return result


class SeparationRule:
    """grpo.constraint's token rule for crystal text: no atom within ``scale * (r_i + r_j)`` of an earlier one
    (see the module docstring)."""

    def __init__(self, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"the separation scale must be > 0, got {scale!r}")
        self.scale = scale
        self._plans: OrderedDict[tuple[int, str, tuple[int, ...]], _Plan] = OrderedDict()
        self._plans_for: Sequence[str] | None = None  # the vocabulary the plans were made for (held)

    def _plan(
        self, written: int, unfinished: str, candidates: Sequence[int], token_texts: Sequence[str]
    ) -> _Plan:
        if token_texts is not self._plans_for:
            self._plans.clear()
            self._plans_for = token_texts
        key = (written, unfinished, tuple(candidates))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(written, unfinished, key[2], token_texts)
            if len(self._plans) > _PLANS_KEPT:
                self._plans.popitem(last=False)
        return plan

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

    def watches(self, text: str, spec: str | None = None) -> bool:
        """Whether the next token may write a coordinate this rule tests (cheap: a split of the text; the
        row's spec does not matter)."""
        return self._state(text) is not None

    def forbidden(
        self, text: str, candidates: Sequence[int], token_texts: Sequence[str], spec: str | None = None
    ) -> list[int]:
        """The candidates after which the text writes an atom whose every completion of (x, y, z) lands on an
        earlier atom, where the text before them left that atom a free point (else the rule gives up on it).
        A token may carry an element and its coordinates, or end one atom and begin the next: each atom the
        token writes coordinates of is tested, against the atoms complete before it."""
        state = self._state(text)
        if state is None:
            return []
        lattice, earlier, current = state
        tail = " ".join(current) + (" " if current and text[-1].isspace() else "")
        grids: dict[tuple, _FreeGrid | None] = {}  # candidates mostly share their atom: look its grid up once

        def grid_of(prior: tuple[str, ...], element: str) -> _FreeGrid | None:
            key = (prior[len(earlier) :], element)  # and atoms the candidate itself completed (usually none)
            if key not in grids:
                grids[key] = _free_grid_of(lattice, prior, element, self.scale)
            return grids[key]

        def free(prior: tuple[str, ...], element: str, coordinates: tuple[str, ...]) -> bool | None:
            grid = grid_of(prior, element)
            return None if grid is None else grid.has_free(coordinates)

        before = tuple(current[1:])  # the current atom's coordinates before the token
        # Most candidates only write more of the current atom, whose element is written: its grid and whether
        # the text before them left it a free point are the same for all of them, and what each writes of it
        # depends on its coordinates so far alone (the plan).
        inside = bool(earlier) and bool(current) and (len(current) > 1 or text[-1].isspace())
        forbidden, rest = [], candidates
        if inside:
            grid = grid_of(earlier, current[0])
            complete = before if text[-1].isspace() else before[:-1]
            unfinished = " " + ("" if text[-1].isspace() else before[-1])
            written_at = [_grid_range(c) for c in complete]
            # (complete coordinates the grammar would not write, a range each: the loop below, token by token)
            if all(r is not None and r[1] - r[0] == 1 for r in written_at):
                plan = self._plan(len(complete), unfinished, candidates, token_texts)
                if grid is not None and grid.has_free(before):
                    forbidden = plan.blocked(grid, tuple(r[0] for r in written_at))
                rest = plan.beyond
        for token in rest:
            prior, fields = earlier, (tail + token_texts[token]).split()
            for start in range(0, len(fields), 4):
                element, coordinates = fields[start], tuple(fields[start + 1 : start + 4])
                # what the text before the token left this atom: its coordinates there, or the whole cell
                if coordinates and prior and free(prior, element, before if start == 0 else ()):
                    if free(prior, element, coordinates) is False:
                        forbidden.append(token)
                        break
                prior += tuple(fields[start : start + 4])
        if rest is not candidates:  # in the candidates' order
            out = set(forbidden)
            forbidden = [token for token in candidates if token in out]
        return forbidden


@functools.lru_cache(maxsize=2**16)  # every candidate of every row asks
def _box(coordinates: tuple[str, ...]) -> tuple[tuple[int, int], ...] | None:
    """The grid index ranges [start, stop) along x, y and z an atom whose coordinates begin with
    `coordinates` may end at (fields past z belong to the next atom); None when one is not a coordinate the
    grammar writes."""
    ranges = tuple(_grid_range(c) for c in coordinates[:3])
    if None in ranges:
        return None
    return (*ranges, *[(0, GRID)] * (3 - len(ranges)))


@functools.lru_cache(maxsize=1024)  # the grammar writes ~111 prefixes
def _grid_range(prefix: str) -> tuple[int, int] | None:
    """The grid indices [start, stop) a coordinate beginning with `prefix` may end at ("0." -> 0-99, "0.3" ->
    30-39)."""
    if _PREFIX.fullmatch(prefix) is None:
        return None
    digits = prefix[2:]
    low = int(digits.ljust(2, "0")) if digits else 0
    high = int(digits.ljust(2, "9")) if digits else GRID - 1
    return low, high + 1

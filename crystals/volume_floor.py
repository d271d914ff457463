"""Cells with room for their atoms: a token rule on the lattice a model writes.

The separation rule (``crystals.separation``) steers each atom to a free point of the cell, but a cell written
too small for the atoms it must hold has none left by its last atoms, and the sample overlaps. A small model
writes such cells: the demo's SFT model, ~8 A^3 per atom where MP-20 has a median of 18. ``VolumeFloorRule``
forbids, while the lattice is written, the tokens after which no completion of the six numbers reaches

    V >= floor * sum_i (4/3) pi r_i^3     (r_i: covalent radius, over the fewest atoms the text can end with),

and, once the lattice is written, the tokens that begin an atom that would take that sum past the cell (in
formula mode, the atom that would begin one more formula unit Z). The default floor 0.9 is what real
crystals satisfy: over the first 3,000 MP-20 test structures, V / sum (4/3) pi r_i^3 has its 0.5th percentile
at 0.91 (1st: 0.94, median 1.48, least 0.64). At 0.9 the spheres of radius 0.5 r_i the validity rule keeps
apart fill at most 14 % of the cell, well below where random placement jams (~38 %).

The counts a text can end with come from its grammar's header (``crystals.grammar.atom_counts``), so the rule
sees the row's spec. The largest volume a lattice prefix can still reach is bounded from above (unwritten
lengths 99.9 A, an unfinished length at its largest completion, the angles at their best), so a token is only
forbidden when no completion can reach the floor. A text already below the floor (or a set of candidates the
rule would empty) is left alone: the rule forbids nothing and the sample is what it would have been.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from ase.data import atomic_numbers, covalent_radii

from crystals.grammar import ELEMENT_SYMBOLS, AtomCounts, atom_counts

LARGEST_LENGTH = 99.9  # the grammar's lengths: 1.0-99.9 A, one decimal
ANGLES = np.arange(60, 121)  # the grammar's whole-degree angles


@functools.cache
def sphere_volume(symbol: str) -> float:
    """(4/3) pi r^3 of an element's covalent radius (A^3)."""
    return 4 / 3 * math.pi * covalent_radii[atomic_numbers[symbol]] ** 3


_counts_of = functools.lru_cache(maxsize=1024)(atom_counts)  # every row asks at every step


def _fields(text: str) -> tuple[list[str], bool]:
    """The whitespace-separated fields of `text` and whether the last one may still grow."""
    return text.split(), bool(text) and not text[-1].isspace()


def _largest_length(prefix: str) -> float:
    """The largest length the grammar can complete `prefix` to ("3" -> 39.9, "3." -> 3.9, "3.5" -> 3.5)."""
    whole, dot, tenths = prefix.partition(".")
    if dot:
        return float(whole) + (float("0." + tenths) if tenths else 0.9)
    return float(prefix + ("9.9" if len(prefix) == 1 else ".9"))


def _angle_choices(field: str, growing: bool) -> np.ndarray:
    """The angles (degrees) a written angle field can end as."""
    if not growing:
        return np.array([float(field)])
    return ANGLES[[str(a).startswith(field) for a in ANGLES]].astype(float)


def largest_volume(text: str) -> float:
    """An upper bound on the cell volume (A^3) of any lattice the text can still end with; inf for text the
    grammar does not write (left to it)."""
    fields, growing = _fields(text)
    lattice = fields[:6]
    last_grows = growing and len(fields) <= 6
    try:
        lengths = [
            LARGEST_LENGTH
            if i >= len(lattice)
            else _largest_length(lattice[i])
            if last_grows and i == len(lattice) - 1
            else float(lattice[i])
            for i in range(3)
        ]
        angles = [
            _angle_choices(lattice[i], last_grows and i == len(lattice) - 1) for i in range(3, len(lattice))
        ]
    except ValueError:
        return math.inf
    if any(len(a) == 0 for a in angles):
        return math.inf
    return math.prod(lengths) * _largest_shape_factor(angles)


def _largest_shape_factor(angles: list[np.ndarray]) -> float:
    """max of sqrt(1 - cos^2 a - cos^2 b - cos^2 g + 2 cos a cos b cos g) (V / abc) over the angles' choices,
    unwritten angles free. With an angle free it is bounded by sin a sin b over the other two (its maximum
    over the free angle), and by 1."""
    if len(angles) == 3:
        a, b, g = np.meshgrid(*(np.cos(np.radians(x)) for x in angles), indexing="ij")
        squared = 1 - a**2 - b**2 - g**2 + 2 * a * b * g
        return float(np.sqrt(np.clip(squared, 0, None)).max())
    sines = [float(np.sin(np.radians(x)).max()) for x in angles] + [1.0] * (2 - len(angles))
    return sines[0] * sines[1]


def needed_volume(text: str, counts: AtomCounts, floor: float) -> float:
    """floor x the covalent-sphere volume of the fewest atoms the text can end with (an unfinished element
    symbol: the element it can become that needs least)."""
    fields, growing = _fields(text)
    symbols = fields[6::4]
    unfinished = growing and len(fields) > 6 and (len(fields) - 7) % 4 == 0
    begun = Counter(symbols[:-1] if unfinished else symbols)
    options = [None]
    if unfinished:
        known = counts.unit or ELEMENT_SYMBOLS
        options = [s for s in known if s.startswith(symbols[-1])]
    needs = []
    for option in options:
        atoms = begun + Counter([option]) if option else begun
        try:
            needs.append(sum(n * sphere_volume(el) for el, n in counts.fewest(atoms).items()))
        except KeyError:  # not an element: left to the grammar
            needs.append(0.0)
    return floor * min(needs, default=0.0)


class VolumeFloorRule:
    """grpo.constraint's token rule for crystal text: cells at least ``floor`` x the covalent-sphere volume of
    their atoms (see the module docstring)."""

    def __init__(self, floor: float = 0.9):
        if not floor > 0:
            raise ValueError(f"the volume floor must be > 0, got {floor!r}")
        self.floor = floor

    def _room(self, text: str, counts: AtomCounts) -> float:
        return largest_volume(text) - needed_volume(text, counts, self.floor)

    def watches(self, text: str, spec: str | None = None) -> bool:
        """While the lattice is written and where the next token may begin an atom (after or inside a z, or
        inside an element symbol)."""
        if _counts_of(spec) is None:
            return False
        fields, growing = _fields(text)
        complete = len(fields) - growing
        return complete < 6 or (complete - 6) % 4 in (0, 3)

    def forbidden(
        self, text: str, candidates: Sequence[int], token_texts: Sequence[str], spec: str | None = None
    ) -> list[int]:
        """The candidates after which no completion of the text has room for its fewest atoms, where the text
        before them had (a lattice token, or one that begins an atom); none if that would be all."""
        counts = _counts_of(spec)
        if counts is None or self._room(text, counts) < 0:
            return []
        fields, growing = _fields(text)
        lattice_written = len(fields) - growing >= 6
        forbidden = [
            token
            for token in candidates
            if (not lattice_written or any(ch.isalpha() for ch in token_texts[token]))
            and self._room(text + token_texts[token], counts) < 0
        ]
        return [] if len(forbidden) == len(candidates) else forbidden

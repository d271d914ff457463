"""Cells with room for their atoms, and not too much: a token rule on the lattice a model writes.

The separation rule (``crystals.separation``) steers each atom to a free point of the cell, but a cell written
too small for the atoms it must hold has none left by its last atoms, and the sample overlaps. A small model
writes such cells: the demo's SFT model, ~8 A^3 per atom where MP-20 has a median of 18. ``CellVolumeRule``'s
floor forbids, while the lattice is written, the tokens after which no completion of the six numbers reaches

    V >= floor * sum_i (4/3) pi r_i^3     (r_i: covalent radius, over the fewest atoms the text can end with),

and, once the lattice is written, the tokens that begin an atom that would take that sum past the cell (in
formula mode, the atom that would begin one more formula unit Z). The floor 0.9 is what real crystals satisfy:
over the first 3,000 MP-20 test structures, V / sum (4/3) pi r_i^3 has its 0.5th percentile at 0.91 (1st:
0.94, median 1.48, least 0.64). At 0.9 the spheres of radius 0.5 r_i the validity rule keeps apart fill at
most 14 % of the cell, well below where random placement jams (~38 %).

Its ceiling is the other end: a cell so roomy that an atom has no neighbour within a potential's cutoff
(CHGNet refuses it) or past ``crystals.guard``'s huge-cell limit (250 A^3 per atom). It bounds the box the
lengths span, which no cell's volume exceeds:

    V <= a b c <= ceiling * N     (A^3 per atom, N: the most atoms the text can end with),

forbidding a length token after which even the shortest completion is too long, and in formula mode (where N
falls to Z x the formula unit once the first element's group closes) the token that would close it while the
box is too big for that Z. A text that meets it before a token always has a next token that still does (the
shortest completion of a length is what it reads as; one more atom of the first element keeps N), so the
ceiling alone never gives up once it held at the start. 150 A^3 per atom is above a b c per atom of every one
of those 3,000 crystals (largest 134, 99.5th percentile 66); in formula mode it keeps V per atom under 150.

The counts a text can end with come from its grammar's header (``crystals.grammar.atom_counts``), so the rule
sees the row's spec. The volume and the box are bounded by the text's completions (lengths 1.0-99.9 A, an
unfinished length anywhere from its value as written to its largest completion, the angles over their
choices), so a token is only forbidden when no completion can meet the bound. A text already past a bound
is left alone by that bound (and a set of candidates the rule would empty by both), and the sample is what
it would have been.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from ase.data import atomic_numbers, covalent_radii

from crystals.grammar import ELEMENT_SYMBOLS, AtomCounts, atom_counts

LARGEST_LENGTH, SMALLEST_LENGTH = 99.9, 1.0  # the grammar's lengths, one decimal
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
    return _angles_beginning(field) if growing else np.array([float(field)])


@functools.lru_cache(maxsize=256)
def _angles_beginning(field: str) -> np.ndarray:
    choices = ANGLES[[str(a).startswith(field) for a in ANGLES]].astype(float)
    choices.flags.writeable = False  # shared by every caller of the cache
    return choices


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


def smallest_box(text: str) -> float:
    """A lower bound on a b c (A^3) of any lattice the text can still end with: each unfinished length at what
    it reads as ("3" -> 3.0, "3." -> 3.0), an unwritten one at 1.0; 0 for text the grammar does not write."""
    lattice = _fields(text)[0][:3]
    try:
        return math.prod(float(lattice[i]) if i < len(lattice) else SMALLEST_LENGTH for i in range(3))
    except ValueError:
        return 0.0


def _largest_shape_factor(angles: list[np.ndarray]) -> float:
    """max of sqrt(1 - cos^2 a - cos^2 b - cos^2 g + 2 cos a cos b cos g) (V / abc) over the angles' choices,
    unwritten angles free. With an angle free it is bounded by sin a sin b over the other two (its maximum
    over the free angle), and by 1. (Plain floats: the choices are a few dozen at most, where numpy's
    per-call cost is most of the time.)"""
    if len(angles) == 3:
        cos_a, cos_b, cos_g = ([_cosine(x) for x in choices] for choices in angles)
        squared = max(1 - a * a - b * b - g * g + 2 * a * b * g for a in cos_a for b in cos_b for g in cos_g)
        return math.sqrt(max(squared, 0.0))
    sines = [max(_sine(x) for x in choices) for choices in angles] + [1.0] * (2 - len(angles))
    return sines[0] * sines[1]


@functools.cache
def _cosine(degrees: float) -> float:
    return math.cos(math.radians(degrees))


@functools.cache
def _sine(degrees: float) -> float:
    return math.sin(math.radians(degrees))


def _symbols_begun(fields: list[str], growing: bool) -> tuple[tuple[str, ...], bool]:
    """The element symbols of a text's fields, and whether the last of them may still grow."""
    return tuple(fields[6::4]), growing and len(fields) > 6 and (len(fields) - 7) % 4 == 0


def _atoms_begun(symbols: tuple[str, ...], last_grows: bool, counts: AtomCounts) -> list[Counter]:
    """The atoms begun, one Counter per element an unfinished last symbol can still become."""
    if not last_grows:
        return [Counter(symbols)]
    known = counts.unit or ELEMENT_SYMBOLS
    return [Counter(symbols[:-1] + (s,)) for s in known if s.startswith(symbols[-1])]


def needed_volume(text: str, counts: AtomCounts, floor: float) -> float:
    """floor x the covalent-sphere volume of the fewest atoms the text can end with (an unfinished element
    symbol: the element it can become that needs least)."""
    return floor * _fewest_spheres(*_symbols_begun(*_fields(text)), counts)


def _fewest_spheres(symbols: tuple[str, ...], last_grows: bool, counts: AtomCounts) -> float:
    needs = []
    for begun in _atoms_begun(symbols, last_grows, counts):
        try:
            needs.append(sum(n * sphere_volume(el) for el, n in counts.fewest(begun).items()))
        except KeyError:  # not an element: left to the grammar
            needs.append(0.0)
    return min(needs, default=0.0)


def allowed_volume(text: str, counts: AtomCounts, ceiling: float) -> float:
    """ceiling x the most atoms the text can end with (an unfinished element symbol: the element it can
    become that allows most)."""
    return ceiling * _most_atoms(*_symbols_begun(*_fields(text)), counts)


def _most_atoms(symbols: tuple[str, ...], last_grows: bool, counts: AtomCounts) -> int:
    begun = _atoms_begun(symbols, last_grows, counts)
    return max((counts.most(atoms) for atoms in begun), default=counts.max_atoms)


# The rule asks for the bounds of every candidate token's text; they are cached on what they read: the
# lattice fields (which the rows of a batch share prefixes of) and the element symbols (which every token of
# an atom shares), never the coordinates.
@functools.lru_cache(maxsize=2**16)
def _lattice_bounds(lattice: str) -> tuple[float, float]:
    return largest_volume(lattice), smallest_box(lattice)


@functools.lru_cache(maxsize=2**16)
def _atom_bounds(spec: str, symbols: tuple[str, ...], last_grows: bool) -> tuple[float, int]:
    counts = _counts_of(spec)
    return _fewest_spheres(symbols, last_grows, counts), _most_atoms(symbols, last_grows, counts)


class CellVolumeRule:
    """grpo.constraint's token rule for crystal text: cells at least ``floor`` x the covalent-sphere volume
    of their atoms, a b c at most ``ceiling`` A^3 per atom (see the module docstring); 0 turns a bound off."""

    def __init__(self, floor: float = 0.9, ceiling: float = 0.0):
        if floor < 0 or ceiling < 0 or not (floor or ceiling):
            raise ValueError(
                f"the volume floor and ceiling must be >= 0, one of them > 0; got {floor!r}, {ceiling!r}"
            )
        self.floor, self.ceiling = floor, ceiling

    def _rooms(self, text: str, spec: str) -> list[float]:
        """How far the text's completions can be inside each bound (< 0: past it whatever follows)."""
        fields, growing = _fields(text)
        # the lattice as the bounds read it: past it, six complete fields
        lattice = " ".join(fields[:6]) + ("" if growing and len(fields) <= 6 else " ")
        largest, smallest = _lattice_bounds(lattice)
        fewest, most = _atom_bounds(spec, *_symbols_begun(fields, growing))
        rooms = []
        if self.floor:
            rooms.append(largest - self.floor * fewest)
        if self.ceiling:
            rooms.append(self.ceiling * most - smallest)
        return rooms

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
        """The candidates after which no completion of the text meets a bound the text before them could
        still meet (a lattice token, or one that begins an atom); none if that would be all."""
        if _counts_of(spec) is None:
            return []
        held = [room >= 0 for room in self._rooms(text, spec)]
        if not any(held):
            return []
        fields, growing = _fields(text)
        lattice_written = len(fields) - growing >= 6

        def breaks_a_held_bound(token: int) -> bool:
            after = self._rooms(text + token_texts[token], spec)
            return any(h and room < 0 for h, room in zip(held, after, strict=True))

        forbidden = [
            token
            for token in candidates
            if (not lattice_written or _has_letter(token_texts[token])) and breaks_a_held_bound(token)
        ]
        return [] if len(forbidden) == len(candidates) else forbidden


@functools.lru_cache(maxsize=4096)
def _has_letter(token_text: str) -> bool:
    return any(ch.isalpha() for ch in token_text)

"""Small textbook crystals for the reward tests (conventional cubic cells written out site by site:
``Structure.from_spacegroup`` costs seconds per call on a busy machine)."""

from __future__ import annotations

from pymatgen.core import Lattice, Structure

from crystals.text import format_structure

FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def shifted(shift: float) -> list[list[float]]:
    return [[(x + shift) % 1, (y + shift) % 1, (z + shift) % 1] for x, y, z in FCC]


def fcc(element: str, a: float) -> Structure:
    return Structure(Lattice.cubic(a), [element] * 4, FCC)


def rocksalt(a: float, cation: str = "Na", anion: str = "Cl") -> Structure:
    return Structure(Lattice.cubic(a), [cation] * 4 + [anion] * 4, FCC + shifted(0.5))


def zincblende(a: float, cation: str = "Zn", anion: str = "S") -> Structure:
    return Structure(Lattice.cubic(a), [cation] * 4 + [anion] * 4, FCC + shifted(0.25))


def text_of(structure: Structure) -> str:
    """Model-style text with enough digits that parsing it gives back the same structure."""
    return format_structure(structure, coord_decimals=4, length_decimals=4, angle_decimals=3)

"""The paper's one-line "bulk representation" of a crystal, and CIF in and out.

Format (paper section 3 and appendix A.4)::

    a b c alpha beta gamma  El x y z  El x y z ...

lengths in angstrom (1 decimal by default), angles in degrees (0 decimals), then one group per site: element
symbol and fractional coordinates (2 decimals) wrapped into [0, 1). Example: ``"5.2 5.2 11.8 90 90 120 Mg 0.33
0.67 0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62"``.

``parse_structure`` reads model output back. It is tolerant of layout (any whitespace, a chat-template prefix
such as ``<|im_start|>assistant``, end-of-text tokens after the structure) but strict about content: exactly six
lattice numbers, then complete ``El x y z`` groups and nothing else. Every failure is a ``ParseError`` with a
machine-readable ``reason`` from ``PARSE_REASONS``; nothing else is ever raised, and the work is linear in the
input length (no regex backtracking, the atom limit stops the scan before any large object is built).

Choices worth knowing:

- Coordinates may lie in [-10, 10]; they are wrapped into [0, 1) (1.00 is the same site as 0.00, the paper
  writes X in [0, 1]^3). Values outside that range are model nonsense and rejected.
- Duplicate or overlapping sites are kept: they are valid syntax, and ``crystals.validity`` judges geometry.
- Element symbols must be the canonical pymatgen ``Element`` symbols (so "D"/"T" isotopes, "X", lower-case
  "fe" are rejected).
- Numbers are plain ASCII decimals (optional sign and exponent). "nan", "inf", "1_0", full-width or other
  Unicode digits are not numbers here, although Python's ``float`` would accept some of them.
"""

from __future__ import annotations

import math
import re
import warnings
from decimal import Decimal
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.io.cif import CifWriter

PARSE_REASONS: tuple[str, ...] = (
    "empty",  # nothing but whitespace / template tokens
    "bad_lattice",  # fewer or more than 6 lattice numbers, a non-number, a length or angle out of range
    "degenerate_lattice",  # angles that cannot close a cell, or volume ~ 0
    "no_atoms",  # the text ends after the lattice
    "unknown_element",  # an atom group whose symbol is not an element
    "bad_coordinates",  # an atom with fewer/more than 3 coordinates, or a coordinate out of range
    "too_many_atoms",  # more than max_atoms atom groups
    "trailing_garbage",  # text that is neither an atom nor an end-of-text token where an atom should start
    "bad_cif",  # read_cif only: pymatgen found no structure in the CIF
)

MAX_LENGTH = 1000.0  # angstrom; MP-20 cells are < 30 A, anything near this cap is model nonsense
MIN_VOLUME = 1e-3  # angstrom^3; below this the cell is numerically singular
MAX_ABS_COORD = 10.0  # fractional coordinates are wrapped into [0, 1) only from this range
_MAX_NUMBER_CHARS = 40  # longer "numbers" are rejected before float() sees them

# Chat-template and end-of-text tokens: <|im_start|>, <|im_end|>, <|endoftext|>, <|eot_id|>,
# <|start_header_id|>, <s>, </s>, <eos>, <bos>, <start_of_turn>, <end_of_turn>.
_TEMPLATE_TOKEN = re.compile(r"<\|[A-Za-z0-9_.:\-]{1,40}\|>|</?s>|<(?:eos|bos|start_of_turn|end_of_turn)>")
# Role names that a template writes right after its turn-start token.
_ROLES = frozenset({"assistant", "model", "gpt", "bot"})
# ASCII decimal with optional sign and exponent. No alternation can match the same text two ways, so
# fullmatch is linear even on 100 kB of digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SYMBOL_SHAPE = re.compile(r"[A-Z][a-z]{0,2}")
_ELEMENTS = frozenset(el.symbol for el in Element)


class ParseError(ValueError):
    """Text that is not a crystal in the bulk representation. ``reason`` is one of ``PARSE_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _wrap01(frac: np.ndarray) -> np.ndarray:
    """x mod 1 in [0, 1): np.mod(-1e-18, 1.0) is 1.0 in floating point, so fold that back to 0."""
    wrapped = np.mod(frac, 1.0)
    return np.where(wrapped >= 1.0, 0.0, wrapped)


def format_structure(
    structure: Structure,
    *,
    length_decimals: int = 1,
    angle_decimals: int = 0,
    coord_decimals: int = 2,
    separator: str = " ",
) -> str:
    """The bulk representation of an ordered structure.

    ``separator`` joins the lattice part and the atom groups ("\\n" gives one line for the lattice and one
    per atom). Coordinates are wrapped into [0, 1) after rounding too, so 0.996 prints as 0.00, never 1.00.
    """
    if not structure.is_ordered:
        raise ValueError("format_structure needs an ordered structure (one element per site)")
    lattice = " ".join(
        [f"{x:.{length_decimals}f}" for x in structure.lattice.abc]
        + [f"{x:.{angle_decimals}f}" for x in structure.lattice.angles]
    )
    coords = _wrap01(np.round(_wrap01(structure.frac_coords), coord_decimals))
    atoms = [
        f"{site.specie.symbol} " + " ".join(f"{x:.{coord_decimals}f}" for x in xyz)
        for site, xyz in zip(structure, coords, strict=True)
    ]
    return separator.join([lattice, *atoms])


def element_order(composition: Composition) -> list[str]:
    """The composition's element symbols, fewest atoms per formula unit first, ties by Pauling
    electronegativity (elements without one, the noble gases, last), then atomic number: a function of the
    composition alone.

    Fewest first because a text that groups atoms by element fixes the number of formula units Z with its
    first group: when the rarest element comes first, that choice is "one atom of it, or two, ...", made right
    after the lattice, and every later group's size follows (the formula grammar forces it)."""
    reduced = composition.reduced_composition

    def key(element: Element) -> tuple[float, float, int]:
        x = element.X
        return (reduced[element], math.inf if math.isnan(x) else x, element.Z)

    return [element.symbol for element in sorted(composition.elements, key=key)]


def canonical_structure(structure: Structure) -> Structure:
    """The same crystal written one way: its Niggli-reduced cell and its sites grouped by element in
    ``element_order`` (sites of one element keep their order).

    A Niggli-reduced cell has all three angles in [60, 90] or all in [90, 120] (never a flat or needle cell),
    which is what lets ``crystals.grammar`` rule out every cell that cannot close; grouped sites let it fix the
    count of each element. Checked on 2,000 MP-20 training structures: every one matches its original under
    StructureMatcher defaults (first 300) and its written lattice matches the grammar (all 2,000)."""
    reduced = structure.get_reduced_structure("niggli")
    rank = {symbol: i for i, symbol in enumerate(element_order(reduced.composition))}
    order = sorted(range(len(reduced)), key=lambda i: rank[reduced[i].specie.symbol])
    return Structure.from_sites([reduced[i] for i in order])


def _tokens(text: str) -> list[str]:
    """Whitespace tokens with template tokens split off (they may be glued: "0.90<|im_end|>"), minus the
    leading run of template tokens (and the role name after one) and the trailing run of template tokens."""
    tokens = _TEMPLATE_TOKEN.sub(lambda m: f" {m.group(0)} ", text).split()
    start = 0
    while start < len(tokens) and _TEMPLATE_TOKEN.fullmatch(tokens[start]):
        start += 1
        if start < len(tokens) and tokens[start] in _ROLES:
            start += 1
    end = len(tokens)
    while end > start and _TEMPLATE_TOKEN.fullmatch(tokens[end - 1]):
        end -= 1
    return tokens[start:end]


def _number(token: str) -> float | None:
    """The token's value when it is a plain ASCII decimal, else None (may be +-inf on overflow)."""
    if len(token) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(token):
        return None
    return float(token)


def _lattice(tokens: list[str]) -> Lattice:
    """The lattice of the first six tokens: lengths in (0, MAX_LENGTH], angles in (0, 180), volume >= MIN_VOLUME.

    With s = (al + be + ga) / 2 the cell's shape factor is

        1 - cos^2 al - cos^2 be - cos^2 ga + 2 cos al cos be cos ga = 4 sin s sin(s - al) sin(s - be) sin(s - ga),

    positive exactly when each angle is below the sum of the other two and the sum is below 360 (else no cell
    exists), and V = abc sqrt(shape). The product form, with s and the differences summed exactly in decimal,
    gives exactly 0 for written angles on that boundary (2.6 1.3 3.9; 120 120 120), where floating-point
    cosines leave a residue that a 1000 A cell would turn into a "valid" volume."""
    values = []
    for k in range(6):
        if k >= len(tokens):
            raise ParseError("bad_lattice", f"expected 6 lattice numbers, got {k}")
        value = _number(tokens[k])
        if value is None:
            raise ParseError("bad_lattice", f"lattice value {k + 1} {tokens[k][:20]!r} is not a number")
        values.append(value)
    lengths, angles = values[:3], values[3:]
    if not all(0.0 < x <= MAX_LENGTH for x in lengths):  # also false for nan and inf
        raise ParseError("bad_lattice", f"lengths {lengths} not in (0, {MAX_LENGTH:g}] A")
    if not all(0.0 < x < 180.0 for x in angles):
        raise ParseError("bad_lattice", f"angles {angles} not in (0, 180) degrees")
    alpha, beta, gamma = (Decimal(t) for t in tokens[3:6])
    s = (alpha + beta + gamma) / 2
    shape = 4 * math.prod(math.sin(math.radians(float(x))) for x in (180 - s, s - alpha, s - beta, s - gamma))
    if shape <= 0.0:
        raise ParseError("degenerate_lattice", f"angles {angles} cannot form a cell")
    volume = math.prod(lengths) * math.sqrt(shape)
    if volume < MIN_VOLUME:
        raise ParseError("degenerate_lattice", f"cell volume {volume:.2e} A^3 < {MIN_VOLUME:g}")
    # The exact check above reads the written decimals; the cell itself is built from their float roundings,
    # which can close a cell that the decimals leave open by less than a float's resolution
    # ("60 60 119.999999999999995" is exactly valid, yet its float angles make a flat cell): check that one too.
    # (A flat cell would make every distance computed from it fail with LinAlgError, as `check` did.)
    lattice = Lattice.from_parameters(*lengths, *angles)
    built = lattice.volume
    if not (np.isfinite(lattice.matrix).all() and built >= MIN_VOLUME):
        raise ParseError("degenerate_lattice", f"cell volume {built:.2e} A^3 < {MIN_VOLUME:g} as built")
    return lattice


def _atoms(tokens: list[str], max_atoms: int) -> tuple[list[str], list[list[float]]]:
    """Species and raw fractional coordinates of the ``El x y z`` groups in ``tokens``."""
    species: list[str] = []
    coords: list[list[float]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token not in _ELEMENTS:
            where = f"atom {len(species)} ({species[-1]})" if species else "the lattice"
            if _number(token) is not None:
                if species:
                    raise ParseError("bad_coordinates", f"{where} has more than 3 coordinates")
                raise ParseError("bad_lattice", "more than 6 numbers before the first element")
            next_is_number = i + 1 < len(tokens) and _number(tokens[i + 1]) is not None
            if _SYMBOL_SHAPE.fullmatch(token) and next_is_number:
                raise ParseError("unknown_element", f"{token!r} is not an element symbol")
            raise ParseError("trailing_garbage", f"unexpected {token[:20]!r} after {where}")
        if len(species) == max_atoms:
            raise ParseError("too_many_atoms", f"more than {max_atoms} atoms")
        xyz = [_number(t) for t in tokens[i + 1 : i + 4]]
        if len(xyz) < 3 or None in xyz:
            raise ParseError("bad_coordinates", f"atom {len(species) + 1} ({token}) needs 3 numbers")
        if not all(abs(x) <= MAX_ABS_COORD for x in xyz):  # also false for nan and inf
            raise ParseError("bad_coordinates", f"atom {len(species) + 1} ({token}) coordinates {xyz}")
        species.append(token)
        coords.append(xyz)
        i += 4
    if not species:
        raise ParseError("no_atoms", "the text ends after the lattice")
    return species, coords


def parse_structure(text: str, *, max_atoms: int = 500) -> Structure:
    """A pymatgen Structure from the bulk representation; raises ``ParseError`` and nothing else."""
    if not isinstance(text, str):
        raise ParseError("empty", f"expected a string, got {type(text).__name__}")
    tokens = _tokens(text)
    if not tokens:
        raise ParseError("empty", "no content")
    lattice = _lattice(tokens)
    species, coords = _atoms(tokens[6:], max_atoms)
    try:
        return Structure(lattice, species, _wrap01(np.asarray(coords, dtype=float)))
    except Exception as e:  # pymatgen should accept anything validated above; never leak its errors
        raise ParseError("degenerate_lattice", f"pymatgen rejected the cell: {e}") from e


def read_cif(text_or_path: str | Path) -> Structure:
    """The first structure of a CIF. A ``Path``, or a one-line string, is a file name; a string with a
    newline is CIF text. Raises ``ParseError("bad_cif")`` when pymatgen finds no structure (it refuses flat
    cells too: a thickness check) and ``OSError`` when the file cannot be read."""
    if isinstance(text_or_path, Path) or "\n" not in text_or_path:
        text = Path(text_or_path).read_text()
    else:
        text = text_or_path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns per odd CIF field; failures still raise below
            return Structure.from_str(text, fmt="cif")
    except Exception as e:  # pymatgen raises ValueError, KeyError, IndexError... on malformed CIFs
        raise ParseError("bad_cif", str(e) or type(e).__name__) from e


def write_cif(structure: Structure) -> str:
    """The structure as a P1 CIF (pymatgen's writer)."""
    return str(CifWriter(structure))

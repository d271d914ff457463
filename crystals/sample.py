"""A generated crystal for one prompt: the ``Sample`` that rewards score and evaluation measures.

A *sample* is one completion for one prompt: the prompt's formula and element set, the generated text and
its parse (a pymatgen ``Structure``, or the ``ParseError`` reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from pymatgen.core import Composition, Element, Structure

from crystals.text import ParseError, format_structure, parse_structure


def elements_of(formula: str) -> frozenset[str]:
    """Element symbols of a formula, e.g. "Fe2O3" -> {"Fe", "O"}; ValueError for anything that is not a
    formula of real elements (a number, "Xx!!", or "Xx", which pymatgen would read as a dummy species)."""
    try:
        elements = Composition(formula).elements if isinstance(formula, str) else None
    except (ValueError, KeyError) as err:
        raise ValueError(f"formula {formula!r} is not a chemical formula ({err})") from None
    if not elements or not all(isinstance(el, Element) for el in elements):
        raise ValueError(f"formula {formula!r} is not a chemical formula")
    return frozenset(el.symbol for el in elements)


@dataclass
class Sample:
    """One generated crystal for one prompt.

    ``structure`` is None exactly when the text did not parse; ``parse_error`` then holds the parser's
    machine-readable reason (e.g. "bad_lattice", "too_many_atoms").
    """

    formula: str
    elements: frozenset[str]
    text: str
    structure: Structure | None
    parse_error: str | None = None

    @classmethod
    def from_text(
        cls, formula: str, text: str, max_atoms: int = 20, elements: frozenset[str] | None = None
    ) -> Sample:
        """Parse ``text``; more than ``max_atoms`` atoms is the parse error "too_many_atoms"."""
        elements = elements_of(formula) if elements is None else frozenset(elements)
        try:
            structure = parse_structure(text, max_atoms=max_atoms)
        except ParseError as exc:
            return cls(formula, elements, text, None, exc.reason)
        return cls(formula, elements, text, structure, None)

    @classmethod
    def from_structure(
        cls, structure: Structure, formula: str | None = None, elements: frozenset[str] | None = None
    ) -> Sample:
        """A sample for an already-built structure (evaluation, CIF files); the prompt defaults to its own
        reduced formula."""
        formula = structure.composition.reduced_formula if formula is None else formula
        elements = elements_of(formula) if elements is None else frozenset(elements)
        return cls(formula, elements, format_structure(structure), structure, None)

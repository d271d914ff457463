"""The text a model may write for a crystal, as a grammar per prompt: the modes of constrained decoding.

A grammar here is an EBNF string in xgrammar's dialect (``root ::= ...``), which `grpo.constraint` turns into
token masks for any tokenizer and vLLM accepts as a per-request structured output. Modes (``CONSTRAINTS``):

- ``none``: no grammar (the paper's setting: the model may write anything, invalid text is penalised);
- ``format``: the bulk text exactly as ``format_structure`` writes a ``canonical_structure``: six lattice
  numbers (lengths 1.0-99.9 A with one decimal, whole-degree angles of a Niggli-reduced cell: all three in
  [60, 90] or all in [90, 120], not 120 120 120), then 1 to ``max_atoms`` lines ``El x y z`` with a real element
  symbol and coordinates 0.00-0.99; the end of text only after a complete atom. Every such text parses, and no
  such cell is degenerate (the reduced-cell angle ranges keep every angle below the sum of the other two and
  the sum below 360, with a shape factor >= 0.02);
- ``elements``: ``format`` with only the prompt's elements, each at least once, grouped in ``element_order``
  (the element-set penalty can never fire);
- ``formula``: the prompt's exact composition, the count of each element Z x its count in the reduced formula
  for some Z with at most ``max_atoms`` atoms, grouped in ``element_order`` (crystal structure prediction, as
  DiffCSP and FlowMM are evaluated).

The grouped modes rely on the training text listing atoms in ``element_order`` (``canonical_structure``), so
the model has learnt to write them that way.

Each grammar opens with a comment that states its counts as data (``AtomCounts``), so a token rule that needs
the composition a text may still end at (``crystals.room``) reads it from the row's spec, not from the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal, NamedTuple

from pymatgen.core import Composition, Element

from crystals.prompts import parse_formula
from crystals.text import element_order

Constraint = Literal["none", "format", "elements", "formula"]
CONSTRAINTS: tuple[str, ...] = ("none", "format", "elements", "formula")
SEPARATORS = {"lines": "\n", "line": " "}  # between the lattice and each atom, per structure_layout

# Rules shared by every grammar. Angles: a Niggli-reduced cell is all-acute (type I, each in [60, 90) and written
# rounded to [60, 90]) or all-obtuse (type II, each in [90, 120]); 120 120 120 is the one flat cell of type II.
_COMMON_RULES = r"""
lattice ::= length " " length " " length " " angles
length ::= [1-9] [0-9]? "." [0-9]
angles ::= acute " " acute " " acute | obtuse " " obtuse " " below120 | obtuse " " below120 " 120" | below120 " 120 120"
acute ::= [6-8] [0-9] | "90"
obtuse ::= "9" [0-9] | "1" [01] [0-9] | "120"
below120 ::= "9" [0-9] | "1" [01] [0-9]
coords ::= " " coord " " coord " " coord
coord ::= "0." [0-9] [0-9]
"""
ELEMENT_SYMBOLS: tuple[str, ...] = tuple(element.symbol for element in Element)


_HEADER = "# atom counts: "


class AtomCounts(NamedTuple):
    """The counts a grammar's text may end with: ``unit`` of each element (in the order the text writes them),
    times a whole Z >= 1 when ``multiples`` (formula mode), else at least ``unit`` (elements: one of each;
    format: nothing); ``max_atoms`` in all at most."""

    unit: dict[str, int]
    multiples: bool
    max_atoms: int

    def fewest(self, begun: Mapping[str, int]) -> dict[str, int]:
        """The fewest atoms of each element a text that has begun `begun` atoms can end with."""
        if self.multiples:
            z = max([1] + [-(-begun.get(el, 0) // n) for el, n in self.unit.items()])
            return {el: z * n for el, n in self.unit.items()}
        fewest = {el: max(n, begun.get(el, 0)) for el, n in self.unit.items()}
        return fewest | {el: n for el, n in begun.items() if el not in self.unit}

    def most(self, begun: Mapping[str, int]) -> int:
        """The most atoms a text that has begun `begun` atoms can end with. In formula mode the first
        element's atoms come first, so once another element has begun they fix Z; before, the largest Z that
        fits. Otherwise ``max_atoms``."""
        if not self.multiples:
            return self.max_atoms
        first, *rest = self.unit
        per_unit = sum(self.unit.values())
        if any(begun.get(el, 0) for el in rest):
            return begun.get(first, 0) // self.unit[first] * per_unit
        return self.max_atoms // per_unit * per_unit


def atom_counts(spec: str | None) -> AtomCounts | None:
    """The AtomCounts a ``structure_grammar`` spec states in its first line (None for any other spec)."""
    if not spec or not spec.startswith(_HEADER):
        return None
    counts = json.loads(spec[len(_HEADER) : spec.index("\n")])
    return AtomCounts(counts["unit"], counts["multiples"], counts["max_atoms"])


def _header(counts: AtomCounts) -> str:
    return _HEADER + json.dumps(counts._asdict()) + "\n"


def _literal(text: str) -> str:
    """An EBNF string literal (JSON escaping is valid xgrammar escaping: newline, quote, backslash)."""
    return json.dumps(text)


def _atom(separator: str, symbols: list[str]) -> str:
    """One atom: separator, an element symbol (one of `symbols`), its three coordinates."""
    choices = " | ".join(_literal(s) for s in sorted(symbols, key=lambda s: (-len(s), s)))
    return f"{_literal(separator)} ({choices}) coords"


def _composition(formula: str | Composition) -> Composition:
    composition = parse_formula(formula) if isinstance(formula, str) else formula
    if len(composition) == 0:
        raise ValueError(f"empty formula {formula!r}")
    return composition


def integer_composition(composition: Composition) -> Composition:
    """The smallest whole-number formula unit (Li0.5CoO2 -> LiCo2O4); ValueError when there is none."""
    formula, _ = composition.get_integer_formula_and_factor()
    reduced = parse_formula(formula).reduced_composition
    if any(abs(amount - round(amount)) > 1e-6 or round(amount) < 1 for amount in reduced.values()):
        raise ValueError(f"{composition.formula} has no whole-number formula unit")
    return reduced


def _formula_rules(counts: dict[str, int], separator: str, max_atoms: int) -> str:
    """root: the lattice, then Z x n_el atoms of each element (`counts`: a whole formula unit, in
    element_order), one alternative per Z."""
    per_unit = sum(counts.values())
    if per_unit > max_atoms:
        formula = "".join(f"{el}{n if n > 1 else ''}" for el, n in counts.items())
        raise ValueError(f"{formula} has {per_unit} atoms per formula unit, more than {max_atoms}")
    alternatives = [
        " ".join(f"({_atom(separator, [symbol])}){{{z * n}}}" for symbol, n in counts.items())
        for z in range(1, max_atoms // per_unit + 1)
    ]
    return "root ::= lattice (" + " | ".join(f"({a})" for a in alternatives) + ")"


def _elements_rules(composition: Composition, separator: str, max_atoms: int) -> str:
    """root: the lattice, then a block of >= 1 atom per element in element_order, <= max_atoms in all.

    State b_i_t: inside element i's block with t atoms written; it may end (last element), add another atom
    of element i, or start element i + 1's block, as long as the remaining elements still fit."""
    symbols = element_order(composition)
    k = len(symbols)
    if k > max_atoms:
        raise ValueError(f"{k} elements cannot fit in {max_atoms} atoms")
    atoms = [_atom(separator, [symbol]) for symbol in symbols]

    def fits(i: int, t: int) -> bool:  # block i holds one atom or more, the k - 1 - i others one each
        return t + (k - 1 - i) <= max_atoms

    rules = [f"root ::= lattice {atoms[0]} b_0_1"]
    for i in range(k):
        for t in range(1 + i, max_atoms + 1):
            if not fits(i, t):
                continue
            options = ['""'] if i == k - 1 else []
            if t < max_atoms and fits(i, t + 1):
                options.append(f"{atoms[i]} b_{i}_{t + 1}")
            if i + 1 < k and t < max_atoms and fits(i + 1, t + 1):
                options.append(f"{atoms[i + 1]} b_{i + 1}_{t + 1}")
            rules.append(f"b_{i}_{t} ::= " + " | ".join(options))
    return "\n".join(rules)


def structure_grammar(
    constraint: Constraint,
    formula: str | Composition | None = None,
    *,
    layout: Literal["lines", "line"] = "lines",
    max_atoms: int = 20,
) -> str | None:
    """The EBNF grammar of `constraint` for a prompt's `formula` (None for "none"); ValueError for an unknown
    mode, a formula that does not fit in `max_atoms`, or a mode that needs a formula without one."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose from {', '.join(CONSTRAINTS)}")
    if layout not in SEPARATORS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(SEPARATORS)}")
    if constraint == "none":
        return None
    separator = SEPARATORS[layout]
    if constraint == "format":
        root = f"root ::= lattice ({_atom(separator, list(ELEMENT_SYMBOLS))}){{1,{max_atoms}}}"
        counts = AtomCounts({}, False, max_atoms)
    elif formula is None:
        raise ValueError(f"constraint {constraint!r} needs the prompt's formula")
    elif constraint == "elements":
        composition = _composition(formula)
        root = _elements_rules(composition, separator, max_atoms)
        counts = AtomCounts({el: 1 for el in element_order(composition)}, False, max_atoms)
    else:
        reduced = integer_composition(_composition(formula))
        counts = AtomCounts({el: int(reduced[el]) for el in element_order(reduced)}, True, max_atoms)
        root = _formula_rules(counts.unit, separator, max_atoms)
    return _header(counts) + root + "\n" + _COMMON_RULES.strip() + "\n"

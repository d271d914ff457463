"""The paper's generation prompt (appendix A.4) for a chemical formula, with two example structures.

The user message is the A.4 text with its paragraphs on separate lines:

    You are a material scientist expert ... of a given chemical formula {formula}. ... with coordinates:
    Example 1:
    <bulk text of example 1>
    Example 2:
    <bulk text of example 2>
    Provide ONLY the bulk representation like the example with no additional text.

Examples are either the paper's fixed two (``PAPER_EXAMPLES``) or two training structures (already in the
``crystals.text.format_structure`` form) drawn with an RNG seeded by (seed, formula), so a resumed run
rebuilds the same prompt for the same formula and the examples never share the prompt's reduced formula
(the model must not be able to copy the answer).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pymatgen.core import Composition

INSTRUCTION = (
    "You are a material scientist expert in crystal structure prediction. Your task is to predict the stable "
    "structure of a given chemical formula {formula}. Generate a description of the lengths and angles of the "
    "lattice vectors and then the element type and coordinates for each atom within the lattice. Format your "
    "answer as lattice lengths, lattice angles, then element symbols with coordinates:"
)
CLOSING = "Provide ONLY the bulk representation like the example with no additional text."

# Appendix A.4, verbatim: LiFePO4-like orthorhombic cell and a hexagonal Mg-Al-O cell.
PAPER_EXAMPLES: tuple[str, str] = (
    "10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75 Fe 0.75 0.50 0.25 P 0.50 0.00 0.50 O 0.10 0.60 0.40 "
    "O 0.90 0.40 0.60 O 0.40 0.90 0.10 O 0.60 0.10 0.90",
    "5.2 5.2 11.8 90 90 120 Mg 0.33 0.67 0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62",
)
N_EXAMPLES = len(PAPER_EXAMPLES)


def parse_formula(formula: str) -> Composition:
    """Composition of a formula string; ValueError for empty input or unknown element symbols."""
    # strict=True: pymatgen would otherwise turn "Xx2" into a dummy species instead of failing.
    return Composition(formula.strip(), strict=True)


def text_formula(text: str) -> str:
    """Reduced formula of a bulk-text structure: count the element tokens (the only tokens starting with a
    letter; the lattice parameters and coordinates are numbers), whatever the line layout."""
    symbols = Counter(token for token in text.split() if token[0].isalpha())
    if not symbols:
        raise ValueError(f"no element symbols in example text {text[:80]!r}")
    return Composition(symbols, strict=True).reduced_formula


def flat_formula(composition: Composition) -> str:
    """A formula without brackets or spaces, amounts of 1 left out: "Rb(CoP)2" -> "RbCo2P2". Every element
    symbol appears once, as in the structure text the model writes."""
    return "".join(
        f"{element}{'' if amount == 1 else f'{amount:g}'}" for element, amount in composition.items()
    )


def generation_prompt(formula: str, examples: Sequence[str]) -> str:
    """The exact A.4 user text for ``formula`` with numbered example structures."""
    if not examples:
        raise ValueError("the A.4 prompt needs at least one example structure")
    lines = [INSTRUCTION.format(formula=formula)]
    for i, example in enumerate(examples, start=1):
        lines += [f"Example {i}:", example.strip()]
    lines.append(CLOSING)
    return "\n".join(lines)


@dataclass(frozen=True)
class CrystalPrompt:
    """One prompt: the formula asked for, its element set (for species-preservation rewards) and the chat."""

    formula: str
    elements: frozenset[str]
    messages: list[dict]

    @property
    def user_text(self) -> str:
        return self.messages[-1]["content"]

    def to_text(self, tokenizer: Any = None) -> str:
        """The string the model sees: the tokenizer's chat template (with the assistant turn opened) when it
        has one, else the plain user text (base models without a template)."""
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=False)
        return self.user_text


class PromptBuilder:
    """Builds A.4 prompts; ``examples="paper"`` uses PAPER_EXAMPLES, ``examples="train"`` draws two of
    ``train_texts`` per formula, deterministically from (seed, formula)."""

    def __init__(
        self,
        examples: Literal["paper", "train"] = "paper",
        train_texts: Sequence[str] = (),
        seed: int = 0,
    ):
        if examples not in ("paper", "train"):
            raise ValueError(f"examples must be 'paper' or 'train', got {examples!r}")
        if examples == "paper" and train_texts:
            raise ValueError("train_texts given but examples='paper'; pass examples='train' to use them")
        if examples == "train" and len(train_texts) < N_EXAMPLES:
            raise ValueError(
                f"examples='train' needs at least {N_EXAMPLES} train_texts, got {len(train_texts)}"
            )
        self.examples = examples
        self.seed = seed
        self.train_texts = list(train_texts)
        self._text_formulas = [text_formula(t) for t in self.train_texts]
        self._formula_counts = Counter(self._text_formulas)

    def _rng(self, formula: str) -> random.Random:
        # hashlib, not hash(): str hashes are salted per process, which would break resumed runs.
        digest = hashlib.sha256(f"{self.seed}\x00{formula}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def _draw_examples(self, formula: str) -> list[str]:
        """N_EXAMPLES distinct train texts whose reduced formula differs from ``formula``'s (rejection
        sampling: expected O(1) draws, since same-formula texts are few)."""
        n_other = len(self.train_texts) - self._formula_counts[formula]
        if n_other < N_EXAMPLES:
            raise ValueError(f"fewer than {N_EXAMPLES} train texts with a formula other than {formula}")
        rng = self._rng(formula)
        picked: list[int] = []
        while len(picked) < N_EXAMPLES:
            i = rng.randrange(len(self.train_texts))
            if i not in picked and self._text_formulas[i] != formula:
                picked.append(i)
        return [self.train_texts[i] for i in picked]

    def fixed_phrases(self) -> list[str]:
        """The stretches of the user text that are the same in every prompt this builder makes (everything but
        the formula and, with training examples, the examples). A tokenizer trained for this task can make
        each one a single token (``grpo.models.train_bpe_tokenizer(phrases=...)``)."""
        hole = "\x00"  # stands in for the parts that vary; never part of the template
        examples = PAPER_EXAMPLES if self.examples == "paper" else [hole] * N_EXAMPLES
        return [piece for piece in generation_prompt(hole, examples).split(hole) if piece]

    def build(self, formula: str) -> CrystalPrompt:
        formula = formula.strip()
        composition = parse_formula(formula)
        if self.examples == "paper":
            examples = list(PAPER_EXAMPLES)
        else:
            examples = self._draw_examples(composition.reduced_formula)
        text = generation_prompt(flat_formula(composition), examples)
        elements = frozenset(el.symbol for el in composition.elements)
        return CrystalPrompt(formula=formula, elements=elements, messages=[{"role": "user", "content": text}])

"""The A.4 generation prompt: exact wording, element sets, seeded train examples, chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from crystals.prompts import PAPER_EXAMPLES, CrystalPrompt, PromptBuilder, generation_prompt, text_formula

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper.txt"
# Appendix A.4 as the paper's text extraction has it: one paragraph per <p>, "formula" as the placeholder.
A4_RAW = (
    "<p>You are a material scientist expert in crystal structure prediction. Your task is to predict the stable "
    "structure of a given chemical formula formula. Generate a description of the lengths and angles of the "
    "lattice vectors and then the element type and coordinates for each atom within the lattice. Format your "
    "answer as lattice lengths, lattice angles, then element symbols with coordinates:</p> <p>Example 1:</p> "
    "<p>10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75 Fe 0.75 0.50 0.25 P 0.50 0.00 0.50 O 0.10 0.60 0.40 O 0.90 "
    "0.40 0.60 O 0.40 0.90 0.10 O 0.60 0.10 0.90</p> <p>Example 2:</p> <p>5.2 5.2 11.8 90 90 120 Mg 0.33 0.67 "
    "0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62</p> <p>Provide ONLY the bulk representation like "
    "the example with no additional text.</p>"
)


def a4_text(formula: str) -> str:
    """The paper's prompt with its paragraphs as lines and the formula in place of the placeholder."""
    paragraphs = A4_RAW.removeprefix("<p>").removesuffix("</p>").split("</p> <p>")
    return "\n".join(paragraphs).replace("chemical formula formula.", f"chemical formula {formula}.")


def make_text(symbols: list[str], a: float = 4.0) -> str:
    """A bulk-text structure (cubic cell, atoms along the diagonal) with the given species."""
    atoms = " ".join(
        f"{el} {i / len(symbols):.2f} {i / len(symbols):.2f} 0.00" for i, el in enumerate(symbols)
    )
    return f"{a:.1f} {a:.1f} {a:.1f} 90 90 90 {atoms}"


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not beside the repo")
def test_reference_text_is_the_papers():
    assert A4_RAW in " ".join(PAPER.read_text().split())


@pytest.mark.parametrize(
    "formula, shown",
    [("NaCl", "NaCl"), ("Nd(Al2Cu)4", "NdAl8Cu4"), ("CoPtO3", "CoPtO3"), ("Li0.5CoO2", "Li0.5CoO2")],
)
def test_paper_prompt_is_exactly_a4(formula, shown):
    prompt = PromptBuilder().build(formula)
    # The formula is shown flat (no brackets), so each element symbol appears once as the model will write it.
    assert prompt.user_text == a4_text(shown)
    assert prompt.user_text == generation_prompt(shown, PAPER_EXAMPLES)
    assert prompt.messages == [{"role": "user", "content": a4_text(shown)}]
    assert prompt.formula == formula


@pytest.mark.parametrize("examples", ["paper", "train"])
def test_fixed_phrases_are_everything_but_the_formula_and_examples(examples):
    train = [make_text(["Na", "Cl"]), make_text(["Fe", "O", "O"]), make_text(["Mg", "O"])]
    builder = PromptBuilder(examples=examples, train_texts=train if examples == "train" else ())
    phrases = builder.fixed_phrases()
    assert len(phrases) == (2 if examples == "paper" else 4)
    for formula in ("NaCl", "Nd(Al2Cu)4"):
        text = builder.build(formula).user_text
        rest = text
        for phrase in phrases:  # in order, non-overlapping
            assert phrase in rest
            rest = rest.split(phrase, 1)[1]
        assert sum(map(len, phrases)) < len(text)
    paper_text = PromptBuilder().build("NaCl").user_text
    assert paper_text == phrases[0] + "NaCl" + phrases[1] if examples == "paper" else True


def test_prompt_knows_its_elements():
    assert PromptBuilder().build("Nd(Al2Cu)4").elements == frozenset({"Nd", "Al", "Cu"})
    assert PromptBuilder().build(" Fe2O3 ").elements == frozenset({"Fe", "O"})


@pytest.mark.parametrize("formula", ["", "Xx2", "hello world"])
def test_bad_formula_rejected(formula):
    with pytest.raises(ValueError):
        PromptBuilder().build(formula)


def test_text_formula_reads_any_layout():
    assert text_formula(PAPER_EXAMPLES[0]) == "LiFePO4"
    assert text_formula(PAPER_EXAMPLES[1]) == "MgAlO2"
    assert (
        text_formula(make_text(["Fe"] * 4 + ["O"] * 6).replace(" Fe", "\nFe").replace(" O", "\nO")) == "Fe2O3"
    )


TRAIN_TEXTS = [
    make_text(["Na", "Cl"]),
    make_text(["Na"] * 2 + ["Cl"] * 2, a=5.6),  # NaCl again, doubled cell
    make_text(["Fe"] * 2 + ["O"] * 3),
    make_text(["Mg", "O"]),
    make_text(["Li", "Fe", "P", "O", "O", "O", "O"]),
    make_text(["Si", "O", "O"]),
    make_text(["Ca", "Ti", "O", "O", "O"]),
    make_text(["Zn", "S"]),
]


def example_texts(prompt: CrystalPrompt) -> list[str]:
    lines = prompt.user_text.split("\n")
    assert lines[1] == "Example 1:" and lines[3] == "Example 2:"
    return [lines[2], lines[4]]


def test_train_examples_deterministic_per_seed_and_formula():
    formulas = ["NaCl", "Fe2O3", "MgO", "CaTiO3", "GaN", "SiO2", "ZnS", "KBr"]
    first = [PromptBuilder("train", TRAIN_TEXTS, seed=3).build(f).user_text for f in formulas]
    again = [PromptBuilder("train", TRAIN_TEXTS, seed=3).build(f).user_text for f in formulas]
    assert first == again
    other_seed = [PromptBuilder("train", TRAIN_TEXTS, seed=4).build(f).user_text for f in formulas]
    assert first != other_seed
    # examples differ between formulas, not one fixed pair per builder
    assert len({tuple(example_texts(PromptBuilder("train", TRAIN_TEXTS).build(f))) for f in formulas}) > 1
    # the order of build calls does not matter (a resumed run starts mid-way)
    builder = PromptBuilder("train", TRAIN_TEXTS, seed=3)
    assert [builder.build(f).user_text for f in reversed(formulas)] == first[::-1]


@pytest.mark.parametrize("formula", ["NaCl", "Na2Cl2", "Fe2O3", "Fe4O6", "MgO", "SiO2"])
def test_train_examples_never_share_the_prompt_formula(formula):
    own = PromptBuilder().build(formula)
    reduced = {"Na2Cl2": "NaCl", "Fe4O6": "Fe2O3"}.get(formula, formula)
    for seed in range(40):
        examples = example_texts(PromptBuilder("train", TRAIN_TEXTS, seed=seed).build(formula))
        assert examples[0] != examples[1]
        assert all(e in TRAIN_TEXTS for e in examples)
        assert reduced not in {text_formula(e) for e in examples}
    assert own.elements == PromptBuilder("train", TRAIN_TEXTS).build(formula).elements


def test_train_mode_needs_two_other_formulas():
    texts = [make_text(["Na", "Cl"]), make_text(["Na"] * 2 + ["Cl"] * 2), make_text(["Mg", "O"])]
    builder = PromptBuilder("train", texts)
    with pytest.raises(ValueError, match="NaCl"):
        builder.build("NaCl")
    enough = texts + [make_text(["Zn", "S"])]
    assert sorted(example_texts(PromptBuilder("train", enough).build("NaCl"))) == sorted(enough[2:])
    with pytest.raises(ValueError):
        PromptBuilder("train", texts[:1])
    with pytest.raises(ValueError):
        PromptBuilder("paper", texts)
    with pytest.raises(ValueError):
        PromptBuilder("random")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level BPE tokenizer trained here on a few prompt words, with a Jinja chat template."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|user|>", "<|assistant|>"])
    tokenizer.train_from_iterator([a4_text("NaCl")] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return fast


def test_chat_template_applied(tiny_tokenizer):
    prompt = PromptBuilder().build("GaN")
    assert prompt.to_text(tiny_tokenizer) == f"<|user|>\n{a4_text('GaN')}\n<|assistant|>\n"
    ids = tiny_tokenizer(prompt.to_text(tiny_tokenizer))["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_plain_text_without_chat_template(tiny_tokenizer):
    prompt = PromptBuilder().build("GaN")
    assert prompt.to_text() == a4_text("GaN")
    no_template = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    assert no_template.chat_template is None
    assert prompt.to_text(no_template) == a4_text("GaN")


def test_train_examples_from_formatted_demo_structures():
    """End to end with the real text format: demo train structures -> format_structure -> prompts."""
    from crystals.data import DEMO_DIR, iter_split
    from crystals.text import format_structure

    records = list(iter_split("train", DEMO_DIR, limit=30))
    texts = [format_structure(r.structure) for r in records]
    assert [text_formula(t) for t in texts] == [r.formula for r in records]
    builder = PromptBuilder("train", texts, seed=0)
    for record in records[:10]:
        prompt = builder.build(record.formula)
        assert prompt.elements == frozenset(el.symbol for el in record.structure.composition.elements)
        assert all(text_formula(e) != record.formula for e in example_texts(prompt))

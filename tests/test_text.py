"""The bulk text representation: exact formatting, tolerant-but-strict parsing, fuzzing, CIF, MP-20 round trip."""

from __future__ import annotations

import math
import random
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Element, Lattice, Structure

from benchmarks.fuzz_parser import GENERATORS, check_parse
from crystals.text import (
    MAX_ABS_COORD,
    PARSE_REASONS,
    ParseError,
    format_structure,
    parse_structure,
    read_cif,
    write_cif,
)

# The paper's two prompt examples (appendix A.4).
LIFEPO4 = (
    "10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75 Fe 0.75 0.50 0.25 P 0.50 0.00 0.50 "
    "O 0.10 0.60 0.40 O 0.90 0.40 0.60 O 0.40 0.90 0.10 O 0.60 0.10 0.90"
)
MGAL2O = "5.2 5.2 11.8 90 90 120 Mg 0.33 0.67 0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62"
CUBIC = "5 5 5 90 90 90 "


def rock_salt_primitive() -> Structure:
    return Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# --- formatting ---------------------------------------------------------------------------------------------


def test_format_is_the_papers_one_line_form():
    assert (
        format_structure(rock_salt_primitive()) == "4.2 4.2 4.2 90 90 90 Na 0.00 0.00 0.00 Cl 0.50 0.50 0.50"
    )


def test_format_precision_and_separator_options():
    s = Structure(Lattice.from_parameters(3.14159, 4, 5, 90, 100.23, 90), ["Li"], [[0.12345, 0.5, 0.5]])
    text = format_structure(s, length_decimals=2, angle_decimals=1, coord_decimals=3, separator="\n")
    assert text.splitlines() == ["3.14 4.00 5.00 90.0 100.2 90.0", "Li 0.123 0.500 0.500"]


def test_format_wraps_coordinates_into_unit_interval_after_rounding():
    s = Structure(
        Lattice.cubic(5), ["Li", "Li", "Li"], [[1.0, -0.25, 0.996], [2.5, 0.3, -1e-18], [0, 0, 0.5]]
    )
    assert format_structure(s).split()[6:] == "Li 0.00 0.75 0.00 Li 0.50 0.30 0.00 Li 0.00 0.00 0.50".split()


def test_format_rejects_disordered_structures():
    s = Structure(Lattice.cubic(5), [{"Li": 0.5, "Na": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="ordered"):
        format_structure(s)


def test_format_writes_element_symbols_of_oxidation_decorated_species():
    s = Structure(Lattice.cubic(4.2), ["Na+", "Cl-"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert format_structure(s) == format_structure(rock_salt_primitive())


# --- parsing valid text -------------------------------------------------------------------------------------


def test_parse_paper_examples():
    lifepo4 = parse_structure(LIFEPO4)
    assert lifepo4.composition.formula == "Li1 Fe1 P1 O4"
    assert np.allclose(lifepo4.lattice.abc, (10.3, 6.0, 4.7))
    assert np.allclose(lifepo4.lattice.angles, (90, 90, 90))
    assert np.allclose(lifepo4.frac_coords[0], (0.25, 0.5, 0.75))
    spinel = parse_structure(MGAL2O)
    assert spinel.composition.reduced_formula == "MgAlO2"
    assert np.isclose(spinel.lattice.gamma, 120)
    # format(parse(x)) gives back the paper's exact text.
    assert format_structure(lifepo4) == LIFEPO4
    assert format_structure(spinel) == MGAL2O


@pytest.mark.parametrize(
    "wrapped",
    [
        "\n\n  " + LIFEPO4.replace(" ", "  \t") + " \n",
        LIFEPO4.replace(" Li", "\nLi").replace(" Fe", "\nFe").replace(" O", "\nO"),
        "<|im_start|>assistant\n" + LIFEPO4 + "<|im_end|>",
        LIFEPO4 + "<|im_end|>\n<|endoftext|>",
        LIFEPO4 + "</s>",
        "<s> " + LIFEPO4 + " </s>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + LIFEPO4 + "<|eot_id|>",
        "<start_of_turn>model\n" + LIFEPO4 + "<end_of_turn><eos>",
        LIFEPO4.replace("0.90", "0.9") + " <|endoftext|><|endoftext|><|endoftext|>",
    ],
)
def test_parse_tolerates_layout_and_template_tokens(wrapped):
    assert format_structure(parse_structure(wrapped)) == LIFEPO4


def test_parse_wraps_coordinates_and_keeps_duplicate_sites():
    s = parse_structure(CUBIC + "Li 1.0 -0.25 10 Li 0 0.75 0 Na 1e-1 .5 +0.5")
    assert np.allclose(s.frac_coords, [[0, 0.75, 0], [0, 0.75, 0], [0.1, 0.5, 0.5]])
    assert len(s) == 3  # the duplicate Li stays; crystals.validity flags the overlap


def test_parse_max_atoms_is_inclusive():
    text = CUBIC + "Li 0 0 0 " * 3
    assert len(parse_structure(text, max_atoms=3)) == 3
    with pytest.raises(ParseError) as e:
        parse_structure(text, max_atoms=2)
    assert e.value.reason == "too_many_atoms"


# --- parsing malformed text ---------------------------------------------------------------------------------

MALFORMED = [
    ("", "empty"),
    (" \n\t ", "empty"),
    ("<|im_start|>assistant\n<|im_end|>", "empty"),
    ("5 5 5 90 90", "bad_lattice"),
    ("Li 0 0 0", "bad_lattice"),
    ("5 5 five 90 90 90 Li 0 0 0", "bad_lattice"),
    ("5 5 5 90 90 90 90 Li 0 0 0", "bad_lattice"),
    ("0 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("-5 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("5000 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("1e999 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("nan 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("inf 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("5 5 5 0 90 90 Li 0 0 0", "bad_lattice"),
    ("5 5 5 90 180 90 Li 0 0 0", "bad_lattice"),
    ("5 5 5 90 90 -90 Li 0 0 0", "bad_lattice"),
    ("5_0 5 5 90 90 90 Li 0 0 0", "bad_lattice"),
    ("\u0665 5 5 90 90 90 Li 0 0 0", "bad_lattice"),  # Arabic-Indic five: float() would accept it
    ("\uff15 5 5 90 90 90 Li 0 0 0", "bad_lattice"),  # full-width five
    ("5 5 5 30 30 90 Li 0 0 0", "degenerate_lattice"),  # alpha + beta < gamma: no such cell
    ("5 5 5 120 120 120 Li 0 0 0", "degenerate_lattice"),  # angles sum to 360: flat
    ("0.05 0.05 0.05 90 90 90 Li 0 0 0", "degenerate_lattice"),  # 1.25e-4 A^3
    # Flat cells whose floating-point shape factor is a rounding residue of ~1e-16, which these lengths
    # would turn into a volume above the 1e-3 A^3 floor.
    ("1000 1000 1000 120 120 120 Li 0 0 0", "degenerate_lattice"),
    ("305 429.6 150.6 3 2 5 Li 0 0 0", "degenerate_lattice"),
    ("349 352.7 201.2 2.6 1.3 3.9 Li 0 0 0", "degenerate_lattice"),
    # The other way round: the written decimals close a cell (60 + 60 > 119.99...), their float roundings
    # (119.999999999999995 is 120.0 as a float) build a flat one of volume 0.0.
    ("100 100 100 60 60 119.999999999999995 Li 0 0 0", "degenerate_lattice"),
    ("10 294 202 122.319999999999999130863 99.882 137.798 Cl 0.4 0.5 0.9", "degenerate_lattice"),
    ("5 5 5 90 90 90", "no_atoms"),
    ("<|im_start|>assistant\n5 5 5 90 90 90<|im_end|>", "no_atoms"),
    (CUBIC + "Xx 0 0 0", "unknown_element"),
    (CUBIC + "Li 0 0 0 Q 0.5 0.5 0.5", "unknown_element"),
    (CUBIC + "D 0 0 0", "unknown_element"),  # pymatgen maps deuterium to H; not a symbol of the format
    (CUBIC + "Li 0 0", "bad_coordinates"),
    (CUBIC + "Li 0 0 0 Na 0.5", "bad_coordinates"),  # truncated generation
    (CUBIC + "Li 0 0 nan", "bad_coordinates"),
    (CUBIC + "Li 0 0 inf", "bad_coordinates"),
    (CUBIC + "Li 0 0 1e400", "bad_coordinates"),
    (CUBIC + f"Li 0 0 {MAX_ABS_COORD + 0.5}", "bad_coordinates"),
    (CUBIC + "Li 0 0 0 0", "bad_coordinates"),
    (CUBIC + "Li 0 zero 0", "bad_coordinates"),
    (CUBIC + "Li 0 0 0 " * 21, "too_many_atoms"),  # parsed with max_atoms=20 below
    (CUBIC + "Li 0 0 0 and that is the structure.", "trailing_garbage"),
    (CUBIC + "Li 0 0 0 The end", "trailing_garbage"),
    (CUBIC + "Li 0 0 0<|im_end|> extra", "trailing_garbage"),
    (CUBIC + "Li 0 0 0 <|im_end|> Na 0 0 0", "trailing_garbage"),
    (CUBIC + "li 0 0 0", "trailing_garbage"),
    (CUBIC + "Li, 0 0 0", "trailing_garbage"),
    (CUBIC + "</p> Li 0 0 0", "trailing_garbage"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED)
def test_parse_rejects_malformed_text_with_reason(text, reason):
    with pytest.raises(ParseError) as e:
        parse_structure(text, max_atoms=20)
    assert e.value.reason == reason
    assert str(e.value) == f"{reason}: {e.value.detail}"
    assert e.value.detail


def test_every_reason_is_listed_and_exercised():
    exercised = {reason for _, reason in MALFORMED} | {"bad_cif"}  # bad_cif: test_read_cif_rejects_garbage
    assert exercised == set(PARSE_REASONS)


def test_parse_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_structure("")


@pytest.mark.parametrize("not_text", [None, b"5 5 5 90 90 90 Li 0 0 0", 5.0])
def test_parse_non_string_raises_parse_error(not_text):
    with pytest.raises(ParseError):
        parse_structure(not_text)


# --- fuzzing ------------------------------------------------------------------------------------------------


def assert_parse_contract(text: str, max_atoms: int = 20) -> None:
    """parse_structure either raises ParseError with a listed reason or returns a sane Structure (at least
    MIN_VOLUME, invertible; see benchmarks.fuzz_parser.check_parse, which the million-input run uses)."""
    _, violation = check_parse(text, max_atoms)
    assert violation is None, violation


NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-2, 200).map(lambda x: f"{x:.2f}"),
    st.integers(-(10**400), 10**400).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "1e-320", ".", "-", "1.2.3", "0x1F", "1_0", "\u0665"]),
)
SYMBOLS = st.sampled_from(["Li", "O", "Fe", "Xx", "D", "li", "FE", "Uuo", "<|im_end|>", "</s>", "Q"])
TOKENS = st.lists(st.one_of(NUMBERS, SYMBOLS, st.text(max_size=8)), max_size=60)
SEPARATORS = st.sampled_from([" ", "\n", "  \t", "\u3000", "\x1c", ""])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_unicode(text):
    assert_parse_contract(text)


@settings(max_examples=300, deadline=None)
@given(TOKENS, SEPARATORS)
def test_fuzz_token_soup(tokens, sep):
    assert_parse_contract(sep.join(tokens))
    assert_parse_contract(CUBIC + sep.join(tokens))


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from(sorted(GENERATORS)))
def test_fuzz_long_digit_and_near_flat_cells(rng, generator):
    """The million-input script's generators (benchmarks/fuzz_parser.py), a few hundred inputs here: cells
    within a float's resolution of not existing, numbers of up to 38 digits."""
    assert_parse_contract(GENERATORS[generator][0](rng))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([LIFEPO4, MGAL2O]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 6), st.text(max_size=6)), min_size=1, max_size=4),
)
def test_fuzz_mutated_valid_text(text, edits):
    for position, deleted, inserted in edits:
        position = min(position, len(text))
        text = text[:position] + inserted + text[position + deleted :]
    assert_parse_contract(text)


HUGE_INPUTS = {
    "digits": "1" * 100_000,
    "lattice then digits": CUBIC + "9" * 100_000,
    "decimal with 100k fraction digits": CUBIC + "Li 0." + "3" * 100_000 + " 0 0",
    "100k of atoms": CUBIC + "Li 0.1 0.2 0.3 " * 7_000,
    "100k of lattice numbers": "5 " * 50_000,
    "exponent soup": "1e" * 50_000,
    "template tokens": "<|im_end|>" * 10_000,
    "open template tokens": "<|" * 50_000,
    "random unicode": "".join(map(chr, random.Random(0).choices(range(1, 0x2FFFF), k=100_000))),
    "no whitespace": "Li0.1" * 20_000,
}


@pytest.mark.parametrize("name", list(HUGE_INPUTS))
def test_huge_inputs_fail_fast(name):
    start = time.perf_counter()
    with pytest.raises(ParseError):
        parse_structure(HUGE_INPUTS[name])
    assert time.perf_counter() - start < 1.0


# --- round-trip properties on generated structures ----------------------------------------------------------


@st.composite
def structures(draw) -> Structure:
    """Random ordered cells with comfortably non-degenerate angles (rounding to 1 degree keeps them valid)."""
    lengths = draw(st.lists(st.floats(2.0, 30.0), min_size=3, max_size=3))
    angles = draw(
        st.lists(st.floats(60.0, 120.0), min_size=3, max_size=3).filter(
            lambda a: (
                1
                - sum(math.cos(math.radians(x)) ** 2 for x in a)
                + 2 * math.prod(math.cos(math.radians(x)) for x in a)
                > 0.1
            )
        )
    )
    n = draw(st.integers(1, 20))
    species = draw(st.lists(st.sampled_from(["H", "Li", "O", "Fe", "Cs", "U"]), min_size=n, max_size=n))
    coords = draw(st.lists(st.floats(-1.5, 1.5), min_size=3 * n, max_size=3 * n))
    return Structure(Lattice.from_parameters(*lengths, *angles), species, np.reshape(coords, (n, 3)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(structures())
def test_format_parse_is_stable_and_within_rounding(s):
    text = format_structure(s)
    parsed = parse_structure(text)
    assert format_structure(parsed) == text
    assert [site.specie for site in parsed] == [site.specie for site in s]
    assert np.allclose(parsed.lattice.abc, s.lattice.abc, atol=0.05 + 1e-9, rtol=0)
    assert np.allclose(parsed.lattice.angles, s.lattice.angles, atol=0.5 + 1e-9, rtol=0)
    delta = parsed.frac_coords - s.frac_coords
    assert np.abs(delta - np.round(delta)).max() <= 0.005 + 1e-9


# --- CIF ----------------------------------------------------------------------------------------------------


def test_cif_round_trip_from_text_and_path(tmp_path):
    s = parse_structure(LIFEPO4)
    cif = write_cif(s)
    assert cif.startswith("# generated using pymatgen")
    from_text = read_cif(cif)
    (tmp_path / "lifepo4.cif").write_text(cif)
    for read in (from_text, read_cif(tmp_path / "lifepo4.cif"), read_cif(str(tmp_path / "lifepo4.cif"))):
        assert format_structure(read) == LIFEPO4


@pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen's own complaints about the CIF
def test_read_cif_rejects_garbage(tmp_path):
    with pytest.raises(ParseError) as e:
        read_cif("data_nothing\n_cell_length_a 5\n")
    assert e.value.reason == "bad_cif"
    with pytest.raises(OSError):
        read_cif(tmp_path / "missing.cif")
    flat = Structure(Lattice.from_parameters(5, 5, 5, 60, 60, 120), ["Li"], [[0, 0, 0]])  # volume 0
    with pytest.raises(ParseError) as e:  # pymatgen's own thickness check: no LinAlgError later
        read_cif(write_cif(flat))
    assert e.value.reason == "bad_cif"


# --- MP-20 round trip ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mp20_round_trip_matches(mp20_dir):
    """format -> parse of a seeded sample of MP-20 test structures matches under StructureMatcher defaults.
    (The full split is measured by benchmarks/roundtrip_and_validity.py.)"""
    frame = pd.read_csv(mp20_dir / "test.csv.gz").sample(n=1000, random_state=0)
    matcher = StructureMatcher()
    matched = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about snapped CIF coordinates
        for cif in frame["cif"]:
            original = Structure.from_str(cif, fmt="cif")
            matched += matcher.fit(original, parse_structure(format_structure(original)))
    assert matched / len(frame) >= 0.995


def test_element_table_is_pymatgens():
    s = parse_structure(CUBIC + " ".join(f"{el.symbol} 0 0 {i / 200:.3f}" for i, el in enumerate(Element)))
    assert len(s) == len(list(Element)) == 118

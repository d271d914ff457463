"""Fuzz `crystals.text.parse_structure` with generated inputs and check its contract on every one.

The contract (`check_parse`): the parser raises ParseError (with a listed reason) and nothing else, and whatever it accepts is a
usable cell: 1..max_atoms sites, coordinates in [0, 1), a finite lattice matrix that can be inverted, and a
volume of at least MIN_VOLUME for the lattice it actually built.

The generators aim at what broke before: cells on the boundary where no cell exists (gamma = alpha + beta, or
the angles summing to 360) written with up to 38 digits, so that the written decimals and their float roundings
fall on different sides; and long-digit, signed and exponent numbers anywhere. tests/test_text.py runs the same
generators under hypothesis (a few hundred inputs); this script runs the million:

    python -m benchmarks.fuzz_parser --n 1000000 [--seed 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import numpy as np

from crystals.text import MIN_VOLUME, PARSE_REASONS, ParseError, parse_structure

MAX_ATOMS = 20
VALID_TEXTS = (
    "10.3 6.0 4.7 90 90 90 Li 0.25 0.50 0.75 Fe 0.75 0.50 0.25 P 0.50 0.00 0.50 O 0.10 0.60 0.40",
    "5.2 5.2 11.8 90 90 120 Mg 0.33 0.67 0.25 Al 0.00 0.00 0.00 O 0.31 0.69 0.38 O 0.69 0.31 0.62",
)
SYMBOLS = ("Li", "O", "Fe", "Na", "Cl", "Xx", "D", "li", "FE", "Q", "<|im_end|>", "</s>", "<|im_start|>")
ODD_NUMBERS = (
    "nan",
    "inf",
    "-inf",
    "1e308",
    "1e-320",
    ".",
    "-",
    "1.2.3",
    "0x1F",
    "1_0",
    "\u0665",
    "+.5",
    "5.",
)


def decimal_text(rng: random.Random, value: Decimal, max_digits: int = 38) -> str:
    """`value` written in plain decimals with up to `max_digits` significant digits (sometimes an exponent)."""
    digits = rng.randint(1, max_digits)
    text = format(value.normalize() if rng.random() < 0.5 else value, "f")
    head, _, tail = text.partition(".")
    text = head + ("." + tail[: max(0, digits - len(head))] if tail else "")
    if rng.random() < 0.1:
        text = f"{Decimal(text):e}"
    return text


def random_number(rng: random.Random) -> str:
    """A number of any size and precision, sometimes not a number at all."""
    roll = rng.random()
    if roll < 0.05:
        return rng.choice(ODD_NUMBERS)
    if roll < 0.1:
        return str(rng.randint(-(10**40), 10**40))
    magnitude = Decimal(10) ** rng.randint(-6, 4)
    return decimal_text(rng, Decimal(rng.uniform(-1.5, 1.5)) * magnitude)


def atoms(rng: random.Random, n: int) -> list[str]:
    """`n` atom groups, nearly all well-formed, with coordinates mostly in [0, 1]."""
    groups = []
    for _ in range(n):
        symbol = rng.choice(SYMBOLS[:5]) if rng.random() < 0.97 else rng.choice(SYMBOLS)
        coords = [decimal_text(rng, Decimal(rng.uniform(-0.1, 1.1)), 20) for _ in range(3)]
        if rng.random() < 0.03:
            coords[rng.randrange(3)] = random_number(rng)
        groups.append(" ".join([symbol, *coords]))
    return groups


def near_flat_cell(rng: random.Random) -> str:
    """A cell on, or within ~1e-30..1e-8 degrees of, the boundary of the cells that exist, with long-digit
    angles and lengths from 1e-2 to 1e3 A."""
    # in thousandths of a degree: gamma = alpha + beta (< 180), or 360 - alpha - beta (alpha + beta > 180)
    alpha = rng.randint(2, 179_998)  # leaves both modes a non-empty range for beta
    if rng.random() < 0.6:
        beta = rng.randint(1, 179_999 - alpha)
        gamma = Decimal(alpha + beta) / 1000
    else:
        beta = rng.randint(180_001 - alpha, 179_999)
        gamma = Decimal(360_000 - alpha - beta) / 1000
    gamma += rng.choice((-1, 1)) * Decimal(rng.randint(1, 10**6)) * Decimal(10) ** -rng.randint(14, 36)
    angles = [Decimal(alpha) / 1000, Decimal(beta) / 1000, gamma]
    rng.shuffle(angles)
    lengths = [Decimal(10 ** rng.uniform(-2, 3)) for _ in range(3)]
    lattice = [decimal_text(rng, x) for x in lengths] + [decimal_text(rng, x) for x in angles]
    return " ".join(lattice + atoms(rng, rng.randint(1, 3)))


def random_cell(rng: random.Random) -> str:
    """Lattice numbers of any size and precision (mostly plausible), then 0..25 atoms."""

    def value(top: float) -> str:
        return random_number(rng) if rng.random() < 0.1 else decimal_text(rng, Decimal(rng.uniform(0, top)))

    lattice = [value(30.0) for _ in range(3)] + [value(180.0) for _ in range(3)]
    return rng.choice((" ", "\n", "  ")).join(lattice + atoms(rng, rng.randint(0, 25)))


def token_soup(rng: random.Random) -> str:
    """Numbers, symbols, template tokens and junk in any order and with any separator."""
    pool: list[Callable[[], str]] = [
        lambda: random_number(rng),
        lambda: rng.choice(SYMBOLS),
        lambda: "".join(chr(rng.randint(33, 0x2FF)) for _ in range(rng.randint(1, 6))),
    ]
    tokens = [rng.choice(pool)() for _ in range(rng.randint(0, 60))]
    prefix = "5 5 5 90 90 90 " if rng.random() < 0.5 else ""
    return prefix + rng.choice((" ", "\n", "\t", "\u3000", "")).join(tokens)


def mutated_text(rng: random.Random) -> str:
    """A valid structure with a few characters deleted, inserted or replaced."""
    text = rng.choice(VALID_TEXTS)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        inserted = "".join(rng.choice("0123456789.-+eE <|>LiOXx\n") for _ in range(rng.randint(0, 5)))
        text = text[:at] + inserted + text[at + rng.randint(0, 6) :]
    return text


def random_unicode(rng: random.Random) -> str:
    return "".join(chr(rng.randint(1, 0x2FFFF)) for _ in range(rng.randint(0, 200)))


GENERATORS: dict[str, tuple[Callable[[random.Random], str], float]] = {
    "near_flat_cell": (near_flat_cell, 0.35),
    "random_cell": (random_cell, 0.3),
    "token_soup": (token_soup, 0.15),
    "mutated_text": (mutated_text, 0.15),
    "random_unicode": (random_unicode, 0.05),
}


def check_parse(text: str, max_atoms: int = MAX_ATOMS) -> tuple[str, str | None]:
    """(outcome, violation) of parsing `text`: "accepted" or the ParseError reason, and what broke the
    contract (None: nothing; then the outcome is "violation")."""
    try:
        s = parse_structure(text, max_atoms=max_atoms)
    except ParseError as err:
        listed = err.reason in PARSE_REASONS
        return (err.reason, None) if listed else ("violation", f"unlisted reason {err.reason!r}")
    except Exception as err:  # noqa: BLE001 - any other exception is what this looks for
        return "violation", f"{type(err).__name__}: {err}"
    matrix = s.lattice.matrix
    if not 1 <= len(s) <= max_atoms:
        return "violation", f"accepted {len(s)} sites"
    if not np.all((s.frac_coords >= 0) & (s.frac_coords < 1)):
        return "violation", "accepted coordinates outside [0, 1)"
    if not (np.isfinite(matrix).all() and s.volume >= MIN_VOLUME):
        return "violation", f"accepted a cell of volume {s.volume!r} A^3"
    try:
        np.linalg.inv(matrix)  # what `crystal-grpo check` died of (LinAlgError) on a flat cell
    except np.linalg.LinAlgError as err:
        return "violation", f"accepted a singular lattice ({err})"
    return "accepted", None


def fuzz(n: int, seed: int = 0) -> dict:
    """Run `n` generated inputs; counts per generator and outcome, and the first violations."""
    rng = random.Random(seed)
    names = list(GENERATORS)
    weights = [GENERATORS[name][1] for name in names]
    outcomes: dict[str, Counter] = {name: Counter() for name in names}
    violations: list[dict] = []
    start = time.perf_counter()
    for _ in range(n):
        name = rng.choices(names, weights)[0]
        text = GENERATORS[name][0](rng)
        outcome, problem = check_parse(text)
        outcomes[name][outcome] += 1
        if problem is not None and len(violations) < 20:
            violations.append({"generator": name, "text": text[:300], "problem": problem})
    total = Counter()
    for counts in outcomes.values():
        total.update(counts)
    return {
        "inputs": n,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        "violations": total["violation"],
        "accepted": total["accepted"],
        "outcomes": {name: dict(counts.most_common()) for name, counts in outcomes.items()},
        "first_violations": violations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = fuzz(args.n, args.seed)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    raise SystemExit(1 if result["violations"] else 0)


if __name__ == "__main__":
    main()

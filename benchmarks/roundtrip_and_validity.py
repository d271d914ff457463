"""Text round trip and validity-check throughput on an MP-20 split.

(a) format_structure -> parse_structure of every structure, matched against the original with pymatgen's
    ``StructureMatcher()`` defaults (ltol 0.2, stol 0.3, angle_tol 5, primitive_cell, scale); every miss
    is listed with a diagnosis.
(b) throughput of each validity check (structures per CPU second) on the parsed structures, pinned to one
    CPU, and the fraction of the split that passes each check.

    python -m benchmarks.roundtrip_and_validity [--data-dir DIR] [--split test] [--limit N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystals.data import CrystalRecord, iter_split
from crystals.text import format_structure, parse_structure
from crystals.validity import (
    check_atom_count,
    check_composition_smact,
    check_species,
    check_structure_cdvae,
    check_structure_covalent,
    min_interatomic_distance,
)

PRIMITIVE_TOLERANCES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)  # angstrom; 0.25 is the matcher's


def _spacegroup(structure: Structure) -> int | None:
    try:
        return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
    except Exception:  # spglib gives up on some cells; the diagnosis then just lacks this field
        return None


def _primitive_sizes(structure: Structure) -> list[int]:
    """Sites of the primitive cell the matcher builds (Niggli cell, then get_primitive_structure) at
    each of PRIMITIVE_TOLERANCES."""
    niggli = structure.get_reduced_structure()
    return [len(niggli.get_primitive_structure(tolerance=t)) for t in PRIMITIVE_TOLERANCES]


def diagnose(original: Structure, parsed: Structure) -> dict:
    """Why a round trip did not match: what rounding changed and which matcher step rejects the pair.

    StructureMatcher() first reduces each structure to a primitive cell (Niggli, then
    get_primitive_structure with a 0.25 A tolerance) and, with attempt_supercell=False, never compares
    primitive cells of different size; only then does it apply ltol/stol/angle_tol."""
    delta = parsed.frac_coords - original.frac_coords
    delta -= np.round(delta)
    shift = np.linalg.norm(delta @ parsed.lattice.matrix, axis=1)
    sizes_original, sizes_parsed = _primitive_sizes(original), _primitive_sizes(parsed)
    k = PRIMITIVE_TOLERANCES.index(0.25)
    rms = StructureMatcher(primitive_cell=False).get_rms_dist(original, parsed)
    if sizes_original[k] != sizes_parsed[k]:
        why = (
            f"the matcher's primitive cells differ in size ({sizes_original[k]} vs {sizes_parsed[k]} sites at "
            "its 0.25 A tolerance): a near-translation (pseudo-symmetry) is accepted on one side of the "
            "rounding and rejected on the other, and cells of different size are never compared"
        )
    else:
        why = "same primitive size; rounded lattice or sites beyond ltol/stol/angle_tol"
    if rms is not None:
        why += f"; matches without primitive reduction (normalised rms {rms[0]:.3f})"
    return {
        "formula": original.composition.reduced_formula,
        "nsites": len(original),
        "abc": [round(x, 4) for x in original.lattice.abc],
        "angles": [round(x, 3) for x in original.lattice.angles],
        "max_site_shift_A": round(float(shift.max()), 4),
        "primitive_tolerances_A": list(PRIMITIVE_TOLERANCES),
        "primitive_sites_original": sizes_original,
        "primitive_sites_parsed": sizes_parsed,
        "spacegroup_symprec_0.1": [_spacegroup(original), _spacegroup(parsed)],
        "rms_without_primitive": None if rms is None else [round(float(x), 4) for x in rms],
        "matches_with_attempt_supercell": bool(
            StructureMatcher(attempt_supercell=True).fit(original, parsed)
        ),
        "explanation": why,
    }


def round_trip(records: list[CrystalRecord]) -> tuple[list[Structure], list[dict]]:
    """Parsed round-trip structures and the diagnosed misses."""
    matcher = StructureMatcher()
    parsed, misses = [], []
    for record in records:
        original = record.structure
        text = format_structure(original)
        back = parse_structure(text)
        parsed.append(back)
        if not matcher.fit(original, back):
            misses.append({"material_id": record.material_id, "text": text, **diagnose(original, back)})
    return parsed, misses


def throughput(fn: Callable, items: list, repeats: int = 2) -> float:
    """Calls per CPU second of fn over items (best of ``repeats`` passes). CPU time of this process, not
    wall time, so other load on a shared machine does not count against the rate."""
    best = np.inf
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, time.process_time() - start)
    return len(items) / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="data dir holding mp20/ (default: $CRYSTAL_GRPO_DATA)"
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, default=None, help="first N structures only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):  # one core, so the rates are per core whatever numpy's threads do
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    records = list(iter_split(args.split, args.data_dir, limit=args.limit))
    structures = [r.structure for r in records]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spglib and pymatgen chatter during the diagnoses
        parsed, misses = round_trip(records)
    round_trip_s = time.perf_counter() - start
    n = len(records)

    texts = [format_structure(s) for s in structures]
    elements = [frozenset(el.symbol for el in s.composition.elements) for s in structures]
    pairs = list(zip(parsed, elements, strict=True))
    checks: dict[str, tuple[Callable, list]] = {
        "parse_structure": (parse_structure, texts),
        "format_structure": (format_structure, structures),
        "check_atom_count": (check_atom_count, parsed),
        "check_species": (lambda p: check_species(*p), pairs),
        "check_structure_cdvae": (check_structure_cdvae, parsed),
        "check_structure_covalent": (check_structure_covalent, parsed),
        "check_composition_smact": (lambda s: check_composition_smact(s.composition), parsed),
        "min_interatomic_distance": (min_interatomic_distance, parsed),
    }
    rates = {name: throughput(fn, items) for name, (fn, items) in checks.items()}
    valid = {
        name: float(np.mean([bool(checks[name][0](item)) for item in checks[name][1]]))
        for name in checks
        if name.startswith("check_")
    }

    result = {
        "split": args.split,
        "n": n,
        "matched": n - len(misses),
        "match_rate": (n - len(misses)) / n,
        "round_trip_seconds": round(round_trip_s, 1),
        "misses": misses,
        "throughput_per_cpu_s_one_core": {k: round(v, 1) for k, v in rates.items()},
        "throughput_note": "structures per CPU second of this process (time.process_time), pinned to one core",
        "valid_fraction": valid,
    }
    print(f"round trip on MP-20 {args.split}: {n - len(misses)}/{n} matched ({result['match_rate']:.4%})")
    for miss in misses:
        print(
            f"  miss {miss['material_id']} {miss['formula']} ({miss['nsites']} sites): {miss['explanation']}"
        )
    print(f"\n{'function':28s} {'per CPU second':>15s} {'valid on ' + args.split:>14s}")
    for name, rate in rates.items():
        share = f"{valid[name]:.2%}" if name in valid else ""
        print(f"{name:28s} {rate:15.0f} {share:>14s}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

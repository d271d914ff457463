"""Relaxed structures re-scored by an independent potential: did RL only fool the potential it trained on?

The structures relaxed by one relaxer (CHGNet) get a single-point energy from another (SevenNet-0, trained
separately on MPtrj), turned into E_hull on the same MP-20 hull with that potential's energy scale. Results are
appended to OUT/rescore-NAME.jsonl as they come, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from crystals.guard import GuardConfig, guard_structure
from crystals.hull import EnergyToHull
from evaluation.jsonl import JsonlAppender, read_jsonl
from evaluation.metrics import METASTABLE_EV
from evaluation.relax import get_relaxer, structure_from_record

# MP energies per atom lie within about -15 and +5 eV/atom; beyond +-20 a potential is outside its domain
PLAUSIBLE_EV_PER_ATOM = 20.0


def rescore_relaxed(
    relaxations: dict[str, dict],
    out_path: Path,
    relaxer: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, dict]:
    """{sample id: {"energy_per_atom", "e_hull", "metastable"} or {"error"}} for every successful relaxation
    in `relaxations` (records of evaluation.relax), under `relaxer`'s potential."""
    spec = get_relaxer(relaxer)
    if spec.energy_scale == "other":
        raise ValueError(f"{relaxer} energies are not on the Materials Project scale: no E_hull to compare")
    hull = EnergyToHull.load(data_dir, cache_dir, apply_mp2020=spec.energy_scale == "mp_uncorrected")
    done = {record["id"]: record for record in read_jsonl(out_path)} if out_path.is_file() else {}
    todo = [(sid, r) for sid, r in relaxations.items() if r.get("ok") and sid not in done]
    if todo:
        calculator = spec.factory()
        with JsonlAppender(out_path) as out:
            for sid, record in todo:
                done[sid] = _score(sid, structure_from_record(record), calculator, hull)
                out.write(done[sid])
    return done


def _score(sid: str, structure, calculator, hull: EnergyToHull) -> dict:
    from pymatgen.io.ase import AseAtomsAdaptor

    start = time.perf_counter()
    reason = guard_structure(structure, GuardConfig(timeout_s=None))
    if reason is not None:
        return {"id": sid, "error": f"rejected: {reason}"}
    try:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator
        energy = float(atoms.get_potential_energy()) / len(atoms)
        if not -PLAUSIBLE_EV_PER_ATOM <= energy <= PLAUSIBLE_EV_PER_ATOM:
            # a cell CHGNet relaxed into nonsense can send another potential to absurd values (seen: -8e12)
            raise ValueError(f"implausible energy {energy:.3g} eV/atom")
        e_hull, _ = hull(structure, energy)
    except Exception as exc:  # one structure's failure is its record, never the run's
        return {"id": sid, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {
        "id": sid,
        "energy_per_atom": energy,
        "e_hull": e_hull,
        "metastable": e_hull < METASTABLE_EV,
        "wall_s": time.perf_counter() - start,
    }

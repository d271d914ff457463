"""The MP-20 convex hull and the route from an MLIP energy to the energy above it (one implementation, used
by the E_hull reward and by evaluation).

Energy above hull of a phase x with formation energy per atom E_f(x) (eV/atom):

    E_hull(x) = E_f(x) - min_{mixtures of competing phases with the composition of x} sum_i f_i E_f(i)

``MP20Hull`` is the lower convex hull of the 45,229 MP-20 formation energies (data/mp20/
mp20_all_splits_meta.csv.gz; MP GGA/GGA+U with MP2020 corrections; elemental references at 0), built as a
pymatgen ``PatchedPhaseDiagram`` as in data/hull/README.md. Building takes ~75 s on 2 cores (several
minutes on a busy machine), so its stable phases are cached as gzipped JSON under
``~/.cache/crystal-grpo`` (or $CRYSTAL_GRPO_CACHE), keyed by the CSV's sha256 (a pickle of the whole
diagram would be 216 MB); loading that takes a fraction of a second. Phase diagrams per chemical system are
then built on demand from the stable phases (a few ms each, kept in memory), which also covers new
combinations of known elements; an element outside MP-20 raises ``HullError``.

Where the hull comes from (``hull_data_paths``, used by every loader): a data directory holding
mp20/mp20_all_splits_meta.csv.gz and hull/ gives the hull of that CSV (built, or read from the cache);
any other (the packaged demo subset, a user's own splits) falls back to the copy packaged in
crystals/hull_data/: the stable phases of the shared MP-20 CSV, in the cache's format and file name, plus the
elemental references (0.4 MB; rebuilt by ``python -m crystals.hull_data.build``). The packaged directory
also acts as a read-only cache: a CSV with the packaged copy's sha256 is never rebuilt.

Caveat from the README: the hull holds only MP-20 phases (<= 20 atoms, E_hull < 0.08), so for novel
compositions it is more lenient than the full MP hull: a missing competing phase makes E_hull too low.

``EnergyToHull`` turns an MLIP total energy into E_hull:

1. MP2020 correction, only if the potential's energies are uncorrected: wrap E in a
   ``ComputedStructureEntry`` with the run type and Hubbard U values MP would have used for that
   composition and apply ``MaterialsProject2020Compatibility`` (anion + GGA/GGA+U mixing corrections).
   CHGNet 0.3.0 predicts energies that already contain these corrections (it was trained on MPtrj's
   corrected energies; matbench-discovery also uses its raw energies), so for CHGNet the correction is NOT
   applied again. Checked on 200 random MP-20 test structures: formation energies from raw CHGNet energies
   match MP-20's with MAE 0.022 eV/atom (0.018 on the 44 oxides); adding the MP2020 correction on top gives
   MAE 0.25 eV/atom, with oxides 0.63 eV/atom too stable (the O correction counted twice).
2. Formation energy against the MP elemental ground states (data/hull/2023-02-07-mp-elemental-reference-
   entries.json.gz): E_f = (E - sum_el n_el mu_el) / N.
3. E_hull from ``MP20Hull``; negative values (below the known hull) are kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import time
from itertools import combinations
from pathlib import Path

from pymatgen.analysis.phase_diagram import PatchedPhaseDiagram, PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Structure
from pymatgen.entries.computed_entries import ComputedEntry

META_FILE = "mp20_all_splits_meta.csv.gz"
REFERENCES_FILE = "2023-02-07-mp-elemental-reference-entries.json.gz"
CACHE_ENV = "CRYSTAL_GRPO_CACHE"
PACKAGED_DIR = Path(__file__).resolve().parent / "hull_data"
# stable-phase files (cache and package): mp20-hull-<first 16 hex of the meta CSV's sha256>.json.gz
STABLE_GLOB = "mp20-hull-*.json.gz"
_STABLE_NAME = re.compile(r"^mp20-hull-([0-9a-f]{16})\.json\.gz$")

log = logging.getLogger(__name__)


class HullError(ValueError):
    """The composition cannot be placed on this hull (an element the hull does not contain)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/crystal-grpo")).expanduser()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_file_name(source_sha256: str) -> str:
    """Name of the stable-phase file of the hull built from a meta CSV with this sha256 (cache and package)."""
    return f"mp20-hull-{source_sha256[:16]}.json.gz"


def write_stable(path: Path, stable: dict[str, list[tuple[str, float]]]) -> None:
    """Write stable phases as gzipped JSON: no timestamp in the gzip header, so equal phases give equal
    bytes; atomic (tmp + rename), so concurrent sessions never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(json.dumps(stable).encode(), mtime=0))
    tmp.replace(path)


def full_data_hull_files(data_dir: str | Path | None = None) -> tuple[Path, Path] | None:
    """(MP-20 meta CSV, elemental references) of a full data directory (the one holding mp20/ and hull/,
    or mp20/ itself; resolved by ``crystals.data.resolve_data_dir``), None when it lacks either file."""
    from crystals.data import resolve_data_dir

    mp20 = resolve_data_dir(data_dir)
    meta, refs = mp20 / META_FILE, mp20.parent / "hull" / REFERENCES_FILE
    return (meta, refs) if meta.is_file() and refs.is_file() else None


def packaged_hull_files(directory: Path = PACKAGED_DIR) -> tuple[Path, Path]:
    """(stable phases, elemental references) packaged in ``directory`` (default crystals/hull_data)."""
    stable = sorted(directory.glob(STABLE_GLOB))
    refs = directory / REFERENCES_FILE
    if len(stable) != 1 or not refs.is_file():
        raise FileNotFoundError(
            f"the packaged MP-20 hull in {directory} is incomplete (expected one {STABLE_GLOB} and "
            f"{REFERENCES_FILE}; found {[p.name for p in stable]}): reinstall crystal-grpo or rebuild it with "
            "`python -m crystals.hull_data.build --data-dir DIR`, or pass a full data directory"
        )
    return stable[0], refs


def hull_data_paths(data_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(hull source, elemental references) for E_hull; the one resolution every loader uses.

    The data directory (option > $CRYSTAL_GRPO_DATA > packaged demo subset) gives (meta CSV, references)
    when it holds both; otherwise the packaged copy gives (stable-phase JSON, references). Either source
    is what ``MP20Hull.load`` takes, with identical E_hull for the shared MP-20 CSV."""
    full = full_data_hull_files(data_dir)
    if full is not None:
        log.info("E_hull: MP-20 hull of the data directory (%s, %s)", *full)
        return full
    packaged = packaged_hull_files()
    log.info(
        "E_hull: packaged MP-20 hull (%s, %s); the data directory has no %s with hull/%s beside it",
        *packaged,
        META_FILE,
        REFERENCES_FILE,
    )
    return packaged


def _composition(composition: Composition | str) -> Composition:
    return composition if isinstance(composition, Composition) else Composition(composition)


class MP20Hull:
    """Convex hull of MP-20 formation energies with ``e_above_hull(composition, e_form_per_atom)``.

    Only hull vertices matter for E_hull, so the hull is stored as its stable phases grouped by chemical
    system ({"Fe-O": [(formula, E_f per atom), ...]}). A query for chemical system S builds (and keeps)
    a pymatgen ``PhaseDiagram`` from the stable phases of all subsystems of S: a composition in S can only
    decompose into phases made of S's elements, so this equals the full hull's answer.
    """

    def __init__(self, stable: dict[str, list[tuple[str, float]]], source_sha256: str = ""):
        self.stable = stable
        self.source_sha256 = source_sha256  # of the meta CSV; its first 16 hex only when read from a file
        self.elements = frozenset(el for chemsys in stable for el in chemsys.split("-"))
        self._pds: dict[frozenset[str], PhaseDiagram] = {}

    @classmethod
    def build(cls, meta_csv: str | Path) -> MP20Hull:
        """Build from the MP-20 meta CSV (slow: a PatchedPhaseDiagram of 45k entries, ~75 s on 2 cores).
        Elemental references at formation energy 0."""
        import pandas as pd

        table = pd.read_csv(
            meta_csv, usecols=["material_id", "formula_prim_cell", "formation_energy_per_atom"]
        )
        entries = []
        for material_id, formula, e_form in zip(
            table.material_id, table.formula_prim_cell, table.formation_energy_per_atom, strict=True
        ):
            comp = Composition(formula)
            entries.append(PDEntry(comp, e_form * comp.num_atoms, name=material_id))
        elements = sorted({el.symbol for entry in entries for el in entry.composition.elements})
        entries += [PDEntry(Composition(el), 0.0, name=el) for el in elements]
        stable: dict[str, list[tuple[str, float]]] = {}
        for entry in PatchedPhaseDiagram(entries).stable_entries:  # a set: sorted below for stable bytes
            comp = entry.composition
            stable.setdefault(comp.chemical_system, []).append((comp.formula, entry.energy_per_atom))
        return cls({k: sorted(v) for k, v in sorted(stable.items())}, file_sha256(meta_csv))

    @classmethod
    def read(cls, path: str | Path, source_sha256: str | None = None) -> MP20Hull:
        """The hull stored in a stable-phase file (``write_stable``); ``source_sha256`` defaults to the key
        in its name."""
        path = Path(path)
        if source_sha256 is None:
            match = _STABLE_NAME.match(path.name)
            source_sha256 = match[1] if match else ""
        with gzip.open(path, "rt") as fh:
            stable = json.load(fh)
        return cls({k: [tuple(x) for x in v] for k, v in stable.items()}, source_sha256)

    @classmethod
    def load(cls, source: str | Path | None = None, cache_dir: str | Path | None = None) -> MP20Hull:
        """The hull of ``source`` (default: ``hull_data_paths()[0]``). A stable-phase file (*.json.gz, e.g.
        the packaged copy) is read as is. For the meta CSV, the file named by its sha256 is read from the
        cache dir or the packaged dir when there, else the hull is built and cached (JSON, ~0.4 MB)."""
        source = Path(source) if source is not None else hull_data_paths()[0]
        if source.name.endswith(".json.gz"):
            return cls.read(source)
        sha = file_sha256(source)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        name = stable_file_name(sha)
        for path in (cache_dir / name, PACKAGED_DIR / name):
            if path.is_file():
                log.info("MP-20 hull of %s read from %s", source, path)
                return cls.read(path, sha)
        log.info("building the MP-20 hull of %s (~75 s on 2 idle cores; cached afterwards)", source)
        start = time.perf_counter()
        hull = cls.build(source)
        write_stable(cache_dir / name, hull.stable)
        log.info(
            "built the MP-20 hull in %.0f s; cached at %s", time.perf_counter() - start, cache_dir / name
        )
        return hull

    def phase_diagram(self, composition: Composition | str) -> PhaseDiagram:
        """The phase diagram of ``composition``'s chemical system (stable MP-20 phases only)."""
        comp = _composition(composition)
        space = frozenset(el.symbol for el in comp.elements)
        outside = space - self.elements
        if outside:
            raise HullError(f"{comp.reduced_formula}: elements {sorted(outside)} are not in the MP-20 hull")
        if space not in self._pds:
            entries = [
                PDEntry(Composition(formula), e_form * Composition(formula).num_atoms)
                for size in range(1, len(space) + 1)
                for subsystem in combinations(sorted(space), size)
                for formula, e_form in self.stable.get("-".join(subsystem), [])
            ]
            self._pds[space] = PhaseDiagram(entries, elements=[Element(el) for el in sorted(space)])
        return self._pds[space]

    def e_above_hull(self, composition: Composition | str, formation_energy_per_atom: float) -> float:
        """E_hull (eV/atom) of a phase with this composition and formation energy; negative when it lies
        below the hull."""
        comp = _composition(composition)
        entry = PDEntry(comp, formation_energy_per_atom * comp.num_atoms)
        _, e_hull = self.phase_diagram(comp).get_decomp_and_e_above_hull(
            entry, allow_negative=True, check_stable=False
        )
        return float(e_hull)


class ElementalReferences:
    """Chemical potentials mu_el (eV/atom): MP GGA/GGA+U elemental ground states (correction 0)."""

    def __init__(self, energies_per_atom: dict[str, float]):
        self.mu = dict(energies_per_atom)

    @classmethod
    def load(cls, path: str | Path | None = None) -> ElementalReferences:
        path = Path(path) if path is not None else hull_data_paths()[1]
        with gzip.open(path, "rt") as fh:
            raw = json.load(fh)
        return cls({el: ComputedEntry.from_dict(entry).energy_per_atom for el, entry in raw.items()})

    def formation_energy_per_atom(self, composition: Composition | str, energy: float) -> float:
        """(E - sum_el n_el mu_el) / N for a total energy E (eV) of a cell with this composition."""
        comp = _composition(composition)
        missing = {el.symbol for el in comp.elements} - set(self.mu)
        if missing:
            raise HullError(f"no elemental reference energy for {sorted(missing)}")
        return (energy - sum(n * self.mu[el.symbol] for el, n in comp.items())) / comp.num_atoms


def mp2020_corrected_energy(structure: Structure, energy: float) -> float:
    """Total energy (eV) plus the MP2020 anion and GGA/GGA+U mixing corrections MP would apply to a
    calculation of this structure run with MP's settings (GGA+U with MP's U values for oxides/fluorides of
    Co, Cr, Fe, Mn, Mo, Ni, V, W; GGA otherwise)."""
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    compat = MaterialsProject2020Compatibility(check_potcar=False)
    comp = structure.composition
    # MP's U values depend on the most electronegative element (O or F); noble gases have X = NaN
    anion = max(comp.elements, key=lambda el: -1.0 if math.isnan(el.X) else el.X).symbol
    u_values = compat.u_settings.get(anion, {})
    hubbards = {el.symbol: u_values[el.symbol] for el in comp.elements if el.symbol in u_values}
    entry = ComputedStructureEntry(
        structure, energy, parameters={"run_type": "GGA+U" if hubbards else "GGA", "hubbards": hubbards}
    )
    processed = compat.process_entry(entry, clean=True, on_error="raise")
    if processed is None:
        raise HullError(f"MP2020 compatibility rejected {comp.reduced_formula}")
    return float(processed.energy)


class EnergyToHull:
    """MLIP energy -> (optional MP2020 correction) -> formation energy -> E_hull on ``MP20Hull``."""

    def __init__(self, hull: MP20Hull, references: ElementalReferences, apply_mp2020: bool = False):
        self.hull = hull
        self.references = references
        self.apply_mp2020 = apply_mp2020

    @classmethod
    def load(
        cls,
        data_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        apply_mp2020: bool = False,
    ) -> EnergyToHull:
        source, refs = hull_data_paths(data_dir)
        return cls(MP20Hull.load(source, cache_dir), ElementalReferences.load(refs), apply_mp2020)

    def formation_energy_per_atom(self, structure: Structure, energy_per_atom: float) -> float:
        energy = energy_per_atom * len(structure)
        if self.apply_mp2020:
            energy = mp2020_corrected_energy(structure, energy)
        return self.references.formation_energy_per_atom(structure.composition, energy)

    def __call__(self, structure: Structure, energy_per_atom: float) -> tuple[float, float]:
        """(E_hull, E_form), both eV/atom, of ``structure`` with MLIP energy ``energy_per_atom``."""
        e_form = self.formation_energy_per_atom(structure, energy_per_atom)
        return self.hull.e_above_hull(structure.composition, e_form), e_form

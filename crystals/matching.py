"""Whether two crystals are the same: an exact cell key, and novelty against known (training) structures.

``structure_key`` is a cheap exact identity: rounded lattice parameters + sorted species/fractional
coordinates, so rotations, site order and repeated generations give the same key (caches, exact
duplicates).

``KnownStructures`` holds structures per reduced formula (the training set) and says whether a structure is
novel: no known structure with the same reduced formula matches it under pymatgen's ``StructureMatcher``
(default tolerances, as the paper's match rate). Training CIFs are parsed on demand, per formula.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


def structure_key(structure: Structure, decimals: int = 4) -> tuple:
    """Hashable key equal for the same crystal written in the same cell, whatever the site order or the
    lattice orientation: rounded (a, b, c, alpha, beta, gamma) + sorted (Z, rounded wrapped frac coords)."""
    params = np.round(np.array(structure.lattice.parameters, dtype=float), decimals)
    frac = np.round(np.mod(structure.frac_coords, 1.0), decimals) % 1.0
    sites = sorted((site.specie.Z, *coords) for site, coords in zip(structure, frac.tolist(), strict=True))
    return (tuple(params.tolist()), tuple(sites))


class KnownStructures:
    """Known structures by reduced formula, with ``is_novel(structure)`` under ``StructureMatcher``."""

    def __init__(self, structures: Iterable[Structure] | None = None, data_dir: str | Path | None = None):
        """Structures given explicitly, or the "train" split of ``data_dir`` (CIFs parsed lazily)."""
        self.matcher = StructureMatcher()
        self._parsed: dict[str, list[Structure]] = defaultdict(list)
        self._cifs: dict[str, list[str]] = {}
        if structures is not None:
            for s in structures:
                self._parsed[s.composition.reduced_formula].append(s)
        else:
            from crystals.data import load_split_frame

            frame = load_split_frame("train", data_dir)
            self._cifs = frame.groupby("reduced_formula")["cif"].apply(list).to_dict()

    def of_formula(self, formula: str) -> list[Structure]:
        """The known structures with this reduced formula."""
        if formula in self._cifs:  # parse a formula's training CIFs the first time it is asked for
            self._parsed[formula] += [Structure.from_str(cif, fmt="cif") for cif in self._cifs.pop(formula)]
        return self._parsed.get(formula, [])

    def is_novel(self, structure: Structure) -> bool:
        """True when no known structure of the same reduced formula matches ``structure``."""
        return not any(
            self.matcher.fit(structure, known)
            for known in self.of_formula(structure.composition.reduced_formula)
        )

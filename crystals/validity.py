"""Validity checks for generated crystals, each returning ``Check(ok, reason)``.

- Structural, CDVAE rule: every interatomic distance >= 0.5 A and cell volume >= 0.1 A^3.
- Structural, paper rule (section 5.3): d_ij > 0.5 (r_i + r_j) with r the covalent radii (Cordero et al.
  2008 via ``ase.data.covalent_radii``; ase has placeholders for Z > 96).
- Compositional: CDVAE's SMACT test (charge neutrality with the Pauling electronegativity ordering).
- Atom count (the paper penalises > 20 atoms) and species preservation (element set == prompt's set).

Periodic distances. With lattice rows A (cart = f A) the distance between sites i and j is

    d_ij = min over n in Z^3, (i, n) != (j, 0), of |(f_j - f_i + n) A|,

so d_ii is the length of the shortest non-zero lattice vector: a site overlaps its own images when a cell
vector is short. pymatgen's ``distance_matrix`` (``Lattice.get_all_distances``) is not enough for the 0.5 A
rule: its diagonal is 0 (CDVAE pads it away, so a 0.3 A cell vector passes CDVAE's own check). Off the
diagonal it is the minimum over the 27 neighbour cells of the LLL-reduced basis: right in practice (never
wrong in 3,000 strongly sheared random cells we tried) but not guaranteed for skewed cells. Here the image
range is bounded exactly, at similar cost: if |(d + n) A| <= r then, with a*_k the k-th column of A^-1,

    |d_k + n_k| = |((d + n) A) . a*_k| <= r |a*_k|,

so for d wrapped into [-1/2, 1/2] all n with |n_k| <= floor(1/2 + r |a*_k|) cover every distance <= r.
We take r = the shortest basis vector, which bounds d_ii and hence min d: every d_ij <= r is exact and
larger ones are reported as something > r. That makes ``min_interatomic_distance`` exact and both distance
rules exact (see ``check_structure_covalent``). For a skewed input basis the range would be large, so
such a basis is LLL-reduced first (pymatgen), which keeps r |a*_k| <= 2^(3/2) and the image count <= 7^3.
The lattice must be non-singular (``parse_structure`` guarantees a volume >= 1e-3 A^3).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import smact
from ase.data import covalent_radii
from pymatgen.core import Composition, Element, Structure

_MAX_IMAGES_UNREDUCED = 27  # more images than this for the input basis: LLL-reduce it first
_CHUNK_FLOATS = 2_000_000  # distance work per numpy call for large structures (memory bound)
_METALS = frozenset(smact.metals)


@dataclass(frozen=True)
class Check:
    """Outcome of one validity check: truthy when ``ok``; ``reason`` says why (short, human-readable)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@functools.cache
def _shift_grid(n_max: tuple[int, int, int]) -> np.ndarray:
    """All integer shifts with |n_k| <= n_max[k], as rows; the zero shift is the middle row."""
    axes = [np.arange(-n, n + 1) for n in n_max]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def _shift_bounds(basis: np.ndarray, inverse: np.ndarray) -> tuple[int, int, int]:
    """Bounds n_max such that the shifts |n_k| <= n_max[k] cover every |(d + n) A| <= L (L = the shortest
    basis vector) for d in [-1/2, 1/2]^3: n_max[k] = floor(1/2 + L |a*_k|), a*_k the columns of A^-1."""
    cutoff = math.sqrt(np.einsum("ij,ij->i", basis, basis).min())
    reciprocal_norms = np.sqrt(np.einsum("ij,ij->j", inverse, inverse))
    return tuple(int(x) for x in np.floor(0.5 + cutoff * reciprocal_norms + 1e-9))


def periodic_distances(structure: Structure) -> np.ndarray:
    """(n, n) periodic distances d_ij over all lattice images, self-images on the diagonal. Exact for every
    distance <= L, the shortest basis vector of the (reduced) cell; a larger distance may come out
    overestimated but always > L, which is all the checks need (module docstring)."""
    lattice = structure.lattice
    basis, frac = lattice.matrix, structure.frac_coords
    n_max = _shift_bounds(basis, lattice.inv_matrix)
    if math.prod(2 * n + 1 for n in n_max) > _MAX_IMAGES_UNREDUCED:
        # LLL basis B = M A (M unimodular), so cart = f A = (f M^-1) B.
        basis, frac = lattice.lll_matrix, frac @ lattice.lll_inverse
        n_max = _shift_bounds(basis, np.linalg.inv(basis))
    shifts = _shift_grid(n_max)
    shift_cart = shifts @ basis  # (m, 3)
    zero = len(shifts) // 2  # the (0, 0, 0) shift: excluded for a site and itself
    n = len(frac)
    out = np.empty((n, n))
    rows = max(1, _CHUNK_FLOATS // max(1, 3 * n * len(shifts)))
    for lo in range(0, n, rows):
        diff = frac[None, :, :] - frac[lo : lo + rows, None, :]  # (rows, n, 3): f_j - f_i
        diff -= np.round(diff)  # into [-1/2, 1/2]
        vectors = (diff @ basis)[:, :, None, :] + shift_cart  # (rows, n, m, 3)
        d2 = np.einsum("ijmk,ijmk->ijm", vectors, vectors)
        block = np.arange(lo, min(lo + rows, n))
        d2[block - lo, block, zero] = np.inf
        out[lo : lo + rows] = np.sqrt(d2.min(axis=2))
    return np.minimum(out, out.T)  # d_ij and d_ji differ by rounding only; make ties (and reasons) exact


def min_interatomic_distance(structure: Structure) -> float:
    """Smallest periodic distance between any two sites or a site and its own image (exact)."""
    return float(periodic_distances(structure).min()) if len(structure) else math.inf


def _pair_name(structure: Structure, i: int, j: int) -> str:
    image = " (periodic image)" if i == j else ""
    return f"{structure[i].specie.symbol}-{structure[j].specie.symbol}{image}"


def check_atom_count(structure: Structure, max_atoms: int = 20) -> Check:
    """At most ``max_atoms`` sites in the cell (the paper penalises > 20)."""
    n = len(structure)
    return Check(True) if n <= max_atoms else Check(False, f"{n} atoms > {max_atoms}")


def check_structure_cdvae(structure: Structure, min_distance: float = 0.5, min_volume: float = 0.1) -> Check:
    """CDVAE's structural validity: volume >= min_volume and every distance >= min_distance, here with a
    site's own periodic images included (CDVAE ignores them)."""
    if not len(structure):
        return Check(False, "no atoms")
    volume = structure.volume
    if not volume >= min_volume:  # also catches nan
        return Check(False, f"volume {volume:.3g} A^3 < {min_volume:g} A^3")
    distances = periodic_distances(structure)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    if distances[i, j] < min_distance:
        name = _pair_name(structure, i, j)
        return Check(False, f"overlap: {name} {distances[i, j]:.2f} A < {min_distance:.2f} A")
    return Check(True)


def covalent_thresholds(structure: Structure, scale: float = 0.5) -> np.ndarray:
    """scale * (r_i + r_j) for every pair of sites: the covalent rule's closest allowed distances."""
    radii = covalent_radii[np.asarray(structure.atomic_numbers)]
    return scale * (radii[:, None] + radii[None, :])


def closest_approach(structure: Structure, thresholds: np.ndarray | float) -> float:
    """min_ij d_ij / threshold_ij over pairs and self-images: <= 1 is an overlap, 0 two coincident atoms.
    Exact below 1 (see check_structure_covalent), which is where it grades an overlap."""
    if not len(structure):
        return 0.0
    return float((periodic_distances(structure) / thresholds).min())


def check_structure_covalent(structure: Structure, scale: float = 0.5) -> Check:
    """The paper's structural validity: d_ij > scale * (r_i + r_j) for all pairs and self-images.

    The verdict is exact although ``periodic_distances`` is only exact up to the shortest basis vector L:
    a failing self-image pair is exact (d_ii <= L); if none fails, L >= d_ii > 2 scale r_max >= every
    threshold, so any pair below its threshold is below L and exact."""
    if not len(structure):
        return Check(False, "no atoms")
    thresholds = covalent_thresholds(structure, scale)
    ratio = periodic_distances(structure) / thresholds
    i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
    if ratio[i, j] <= 1.0:
        d = ratio[i, j] * thresholds[i, j]
        name = _pair_name(structure, i, j)
        return Check(False, f"overlap: {name} {d:.2f} A <= {thresholds[i, j]:.2f} A ({scale:g} x radii sum)")
    return Check(True)


@functools.cache
def _smact_element(symbol: str) -> tuple[tuple[int, ...], float | None]:
    """Oxidation states and Pauling electronegativity (None when unknown) of an element in SMACT's
    original 2014 set, the ``oxidation_states`` that smact 2.x (and so CDVAE) used; newer smact made the
    ICSD-24 set its default. Elements SMACT does not know get no states."""
    try:
        element = smact.Element(symbol)
    except KeyError:  # smact has no data for Z > 103
        return (), None
    return tuple(element.oxidation_states_smact14 or ()), element.pauling_eneg


def _charge_neutral(counts: list[int], allowed: list[tuple[int, ...]]) -> bool:
    """Whether some choice of one state per element gives sum_i counts_i * state_i = 0.

    Dynamic programming over reachable total charges, kept as bits of a Python int (bit q + offset set
    when charge q is reachable; offset = sum_i counts_i max|state_i| keeps every partial sum >= 0)."""
    offset = sum(
        c * max((abs(s) for s in states), default=0) for c, states in zip(counts, allowed, strict=True)
    )
    reachable = 1 << offset
    for count, states in zip(counts, allowed, strict=True):
        nxt = 0
        for state in states:
            shift = count * state
            nxt |= reachable << shift if shift >= 0 else reachable >> -shift
        reachable = nxt
    return bool((reachable >> offset) & 1)


def check_composition_smact(composition: Composition | str) -> Check:
    """CDVAE's SMACT validity: valid if the composition has one element, or only metals (an alloy), or
    one oxidation state per element (SMACT 2014 set) makes it charge-neutral, sum_i n_i q_i = 0, with every
    cation less electronegative than every anion (Pauling), i.e. max eneg(q > 0) < min eneg(q < 0).

    CDVAE enumerates all state combinations; the same answer comes faster from splitting the elements by
    electronegativity (those below a threshold take states >= 0, the rest states <= 0; elements of equal
    electronegativity stay together) and asking ``_charge_neutral`` for each of the <= m + 1 splits.
    Like CDVAE, one state per element: Fe3O4 (Fe2+ Fe3+) is invalid.

    An element without a Pauling electronegativity (Pm, Rn, Lr among those with states) makes smact 2.x
    raise TypeError inside the ordering test, which CDVAE catches with "assume it is okay"; we then skip the
    ordering test. That is CDVAE's stated intent, not its exact output: smact 2.x rejects a same-sign pair
    with a missing value when it reaches one before the raising pair (9 of the 9,046 MP-20 test formulas,
    all with Pm, differ), and smact >= 3 rejects every such combination.
    """
    composition = Composition(composition)
    amounts = composition.get_el_amt_dict()
    if not amounts:
        return Check(False, "empty composition")
    counts = [round(a) for a in amounts.values()]
    if any(abs(a - c) > 1e-6 or c <= 0 for a, c in zip(amounts.values(), counts, strict=True)):
        raise ValueError(f"SMACT check needs positive integer amounts, got {composition}")
    symbols = list(amounts)
    if len(symbols) == 1:
        return Check(True, "single element")
    if all(s in _METALS for s in symbols):
        return Check(True, "all-metal alloy")
    gcd = math.gcd(*counts)
    counts = [c // gcd for c in counts]
    states = [_smact_element(s)[0] for s in symbols]
    stateless = [s for s, st in zip(symbols, states, strict=True) if not st]
    if stateless:
        return Check(False, f"no oxidation states for {', '.join(stateless)}")
    if not _charge_neutral(counts, states):
        return Check(False, "no charge-neutral combination of oxidation states")
    enegs = [_smact_element(s)[1] for s in symbols]
    if None in enegs:
        return Check(True, "charge-neutral (no electronegativity data for the ordering test)")
    for threshold in sorted(set(enegs)) + [math.inf]:
        allowed = [
            tuple(q for q in st if (q >= 0 if e < threshold else q <= 0))
            for st, e in zip(states, enegs, strict=True)
        ]
        if _charge_neutral(counts, allowed):
            return Check(True, "charge-neutral with cations less electronegative than anions")
    return Check(False, "charge-neutral only with a cation more electronegative than an anion")


def check_species(structure: Structure, elements: Iterable[str | Element]) -> Check:
    """The structure's element set equals ``elements`` (the prompt's formula elements)."""
    expected = {str(e) for e in elements}
    present = {el.symbol for el in structure.composition.elements}
    if present == expected:
        return Check(True)
    missing, extra = sorted(expected - present), sorted(present - expected)
    parts = ([f"missing {' '.join(missing)}"] if missing else []) + (
        [f"extra {' '.join(extra)}"] if extra else []
    )
    return Check(False, "; ".join(parts))

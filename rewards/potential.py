"""Structure -> MLIP energy per atom, robustly: what every potential-based reward shares.

A ``Potential`` (CHGNet, any ASE calculator) only knows two steps: ``prepare(structure)`` (per structure:
graph or ASE Atoms) and ``predict(prepared_batch) -> [eV/atom]`` (batched). ``EnergyEvaluator`` wraps them
so that one bad structure costs only its own reward:

1. ``crystals.guard.guard_structure`` rejects cells that would make the neighbour list explode or be
   meaningless before any potential code runs (non-finite or ~0 volume, huge cells, too many neighbours
   or periodic images within the cutoff).
2. Cache: results are keyed by ``crystals.matching.structure_key`` (rounded lattice parameters + sorted
   species/fractional coordinates, so rotations, site order and repeated generations hit the cache).
3. ``prepare`` runs per structure (an exception or timeout fails only that structure); ``predict`` runs per
   batch of ``potential.batch_size``; a batch that raises, times out or returns the wrong number of values
   is retried one structure at a time; a NaN/inf energy fails that structure.

Timeouts use SIGALRM when called from the main thread with no other interval timer running; a long call
inside C code is interrupted when it returns to Python, and elsewhere (other threads) an over-long call is
failed after the fact. ``relax_steps > 0`` first relaxes each structure briefly (FIRE + FrechetCellFilter
through the potential's ASE calculator), per structure, under the same timeout. ``volume_scan`` (a few volume
factors) takes each energy at the best of those isotropic rescalings of the cell (``VolumeScan``).

``PotentialReward`` = the ``Penalties`` gate + ``EnergyEvaluator`` + a per-sample ``score``; ``EnergyReward``
is reward = -E (eV/atom, or eV per cell with ``per_cell``).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pymatgen.core import Structure

from crystals.guard import GuardConfig, guard_structure
from crystals.hull import EnergyToHull
from crystals.matching import structure_key
from crystals.potentials import EnergyScale
from crystals.sample import Sample
from rewards.base import RewardOutput
from rewards.penalties import Penalties, PenaltyConfig, make_penalties

log = logging.getLogger(__name__)
T = TypeVar("T")


class Potential(Protocol):
    name: str
    batch_size: int
    energy_scale: EnergyScale

    def prepare(self, structure: Structure) -> Any:
        """Per-structure preprocessing (graph, ASE Atoms); may raise for that structure only."""

    def predict(self, prepared: Sequence[Any]) -> list[float]:
        """Energies per atom (eV/atom) of a batch of prepared structures."""

    def calculator(self) -> Any:
        """An ASE calculator of the same model (for relaxation)."""


class Timeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise Timeout("deadline passed")


def call_with_timeout(fn: Callable[[], T], seconds: float | None) -> T:
    """``fn()``, raising ``Timeout`` once it has run ``seconds`` (see the module docstring for limits)."""
    if seconds is None:
        return fn()
    use_alarm = (
        threading.current_thread() is threading.main_thread()
        and hasattr(signal, "setitimer")
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0  # never steal a timer someone else set
    )
    previous = signal.getsignal(signal.SIGALRM) if use_alarm else None
    start = time.perf_counter()
    try:
        if use_alarm:
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        result = fn()
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if time.perf_counter() - start > seconds:
        raise Timeout(f"took {time.perf_counter() - start:.1f} s > {seconds} s")
    return result


def relax_structure(structure: Structure, calculator: Any, steps: int, fmax: float = 0.05) -> Structure:
    """At most ``steps`` FIRE steps on positions and cell (FrechetCellFilter) with an ASE calculator."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(structure)
    atoms.calc = calculator
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=fmax, steps=steps)
    return AseAtomsAdaptor.get_structure(atoms)


class VolumeScan:
    """A ``Potential`` whose energy of a structure is the lowest over a few isotropic rescalings of its cell:

        E(x) = min_{f in factors} E(x with its cell volume times f, fractional coordinates kept)

    Why: a reward on the structure as written pays for a low raw energy, and the cheapest route there is the
    cell volume. An over-dense cell's raw energy sits far above its relaxed one, so GRPO on E_hull learned to
    inflate the cells (reproduction run v4: median 15.3 -> 27.6 A^3 per atom), whose relaxed energies were
    then worse. Taking the best volume out of the model's hands leaves it paid for what relaxation does not
    undo (the arrangement of the atoms), at len(factors) energies per structure, batched. A rescaled cell the
    potential cannot take (``prepare`` raises, e.g. isolated atoms in an expanded cell) is left out; a
    structure fails only when none of its rescalings is usable.
    """

    def __init__(self, potential: Potential, factors: Sequence[float]):
        if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
            raise ValueError(f"volume_scan needs positive volume factors, got {list(factors)}")
        self.potential = potential
        self.factors = tuple(float(f) for f in factors)
        self.name = potential.name
        self.batch_size = potential.batch_size
        self.energy_scale = potential.energy_scale

    def prepare(self, structure: Structure) -> list[Any]:
        prepared, errors = [], []
        for factor in self.factors:
            scaled = structure.copy()
            scaled.scale_lattice(structure.volume * factor)
            try:
                prepared.append(self.potential.prepare(scaled))
            except Exception as exc:
                errors.append(f"x{factor:g}: {exc!r}")
        if not prepared:
            raise ValueError(f"no rescaled cell could be prepared ({'; '.join(errors)[:300]})")
        return prepared

    def predict(self, prepared: Sequence[list[Any]]) -> list[float]:
        energies = self.potential.predict([item for scaled in prepared for item in scaled])
        if len(energies) != sum(map(len, prepared)):
            raise ValueError(
                f"{self.name} returned {len(energies)} energies for {sum(map(len, prepared))} cells"
            )
        best, start = [], 0
        for scaled in prepared:
            finite = [e for e in energies[start : start + len(scaled)] if math.isfinite(e)]
            best.append(min(finite) if finite else math.nan)
            start += len(scaled)
        return best

    def calculator(self) -> Any:
        return self.potential.calculator()


@dataclass(frozen=True)
class EnergyResult:
    """Energy per atom (eV/atom, NaN when ``failure`` says why there is none) of ``structure`` (the relaxed
    one when relaxing); ``seconds`` is this structure's share of the potential time."""

    energy_per_atom: float
    structure: Structure
    failure: str | None = None
    seconds: float = 0.0
    cached: bool = False


class EnergyEvaluator:
    """Guarded, cached, batched, failure-isolated energies from a ``Potential``."""

    def __init__(
        self,
        potential: Potential,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
        relax_fmax: float = 0.05,
        volume_scan: Sequence[float] = (),
    ):
        self.potential = VolumeScan(potential, volume_scan) if volume_scan else potential
        self.guard = guard or GuardConfig()
        self.cache_size = cache_size
        self.relax_steps = relax_steps
        self.relax_fmax = relax_fmax
        self._cache: OrderedDict[tuple, tuple[float, Structure]] = OrderedDict()
        self._calculator = None
        self.failures: Counter[str] = Counter()  # reason -> count, over all calls
        self._warned: set[str] = set()  # failure reasons already logged as a warning

    def __call__(self, structures: Sequence[Structure]) -> list[EnergyResult]:
        results: list[EnergyResult | None] = [None] * len(structures)
        pending: dict[tuple, list[int]] = {}  # key -> indices of structures waiting for that key
        prepared: list[tuple[tuple, Any, Structure, float]] = []  # (key, prepared, structure, seconds)
        for i, structure in enumerate(structures):
            reason = guard_structure(structure, self.guard)
            if reason is not None:
                results[i] = self._failed(structure, reason)
                continue
            key = structure_key(structure)
            if key in self._cache:
                self._cache.move_to_end(key)
                energy, final = self._cache[key]
                results[i] = EnergyResult(energy, final, cached=True)
            elif key in pending:
                pending[key].append(i)  # same crystal twice in one batch: compute once
            else:
                pending[key] = [i]
                start = time.perf_counter()
                try:
                    final, item = call_with_timeout(
                        lambda s=structure: self._prepare(s), self.guard.timeout_s
                    )
                except Timeout:
                    results[i] = self._failed(structure, "timeout")
                    del pending[key]
                    continue
                except Exception as exc:
                    results[i] = self._failed(structure, f"prepare_error:{type(exc).__name__}", exc)
                    del pending[key]
                    continue
                prepared.append((key, item, final, time.perf_counter() - start))
        size = max(1, self.potential.batch_size)
        for lo in range(0, len(prepared), size):
            chunk = prepared[lo : lo + size]
            for (key, _, final, prep_s), (energy, failure, predict_s) in zip(
                chunk, self._predict(chunk), strict=True
            ):
                first, *repeats = pending[key]
                if failure is None:
                    self._remember(key, energy, final)
                    results[first] = EnergyResult(energy, final, seconds=prep_s + predict_s)
                else:
                    results[first] = self._failed(structures[first], failure)
                for j in repeats:
                    results[j] = EnergyResult(results[first].energy_per_atom, final, failure, cached=True)
        return results  # type: ignore[return-value]

    def _prepare(self, structure: Structure) -> tuple[Structure, Any]:
        if self.relax_steps > 0:
            if self._calculator is None:
                self._calculator = self.potential.calculator()
            structure = relax_structure(structure, self._calculator, self.relax_steps, self.relax_fmax)
            if (reason := guard_structure(structure, self.guard)) is not None:
                raise ValueError(f"relaxation produced an unusable cell ({reason})")
        return structure, self.potential.prepare(structure)

    def _predict(self, chunk: list) -> list[tuple[float, str | None, float]]:
        """(energy, failure, seconds) per item; a failing batch is split into single items."""
        items = [item for _, item, _, _ in chunk]
        timeout = None if self.guard.timeout_s is None else self.guard.timeout_s * len(items)
        start = time.perf_counter()
        try:
            energies = call_with_timeout(lambda: list(self.potential.predict(items)), timeout)
            if len(energies) != len(items):
                raise ValueError(f"potential returned {len(energies)} energies for {len(items)} structures")
        except Exception as exc:
            if len(chunk) > 1:
                log.warning(
                    "%s failed on a batch of %d (%r); retrying one by one",
                    self.potential.name,
                    len(chunk),
                    exc,
                )
                return [out for one in chunk for out in self._predict([one])]
            reason = "timeout" if isinstance(exc, Timeout) else f"predict_error:{type(exc).__name__}"
            log.warning(
                "%s failed on %s: %r", self.potential.name, chunk[0][2].composition.reduced_formula, exc
            )
            return [(math.nan, reason, time.perf_counter() - start)]
        seconds = (time.perf_counter() - start) / len(items)
        return [(float(e), None if math.isfinite(e) else "nonfinite_energy", seconds) for e in energies]

    def _remember(self, key: tuple, energy: float, structure: Structure) -> None:
        self._cache[key] = (energy, structure)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _failed(self, structure: Structure, reason: str, exc: Exception | None = None) -> EnergyResult:
        """Count a structure without an energy (its reward carries the reason). A cell the guard rejects or
        whose energy is not finite is an outcome of sampling, logged at debug level; a potential that raised or
        timed out is a warning the first time for each reason, then debug (a run logs the counts per step)."""
        self.failures[reason] += 1
        surprising = (exc is not None or reason == "timeout") and reason not in self._warned
        if surprising:
            self._warned.add(reason)
        log.log(
            logging.WARNING if surprising else logging.DEBUG,
            "%s: no energy for %s (%s)%s",
            self.potential.name,
            structure.composition.reduced_formula,
            reason,
            f": {exc!r}" if exc is not None else "",
        )
        return EnergyResult(math.nan, structure, reason)


class PotentialReward:
    """Gate -> energies -> ``score``. Subclasses implement ``score(sample, result) -> (reward, info)``.

    Samples the gate rejects get ``penalties.value(reason)``; structures without an energy (or whose
    ``score`` raises) get the ``failure`` penalty with reason "failure:<why>". ``penalties`` may be a
    ``Penalties``, a ``PenaltyConfig`` or a mapping of overrides on top of ``default_penalties``.
    """

    name = "potential"
    default_penalties = PenaltyConfig()  # the paper's -0.1 everywhere

    def __init__(
        self,
        potential: Potential,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
        volume_scan: Sequence[float] = (),
    ):
        self.potential = potential
        self.penalties = make_penalties(penalties, self.default_penalties)
        self.evaluator = EnergyEvaluator(potential, guard, cache_size, relax_steps, volume_scan=volume_scan)

    @property
    def failure_penalty(self) -> float:
        return self.penalties.config.failure

    def score(self, sample: Sample, result: EnergyResult) -> tuple[float, dict]:
        raise NotImplementedError

    def __call__(self, samples: Sequence[Sample]) -> RewardOutput:
        reasons = [self.penalties.check(sample) for sample in samples]
        clean = [i for i, reason in enumerate(reasons) if reason is None]
        results = dict(zip(clean, self.evaluator([samples[i].structure for i in clean]), strict=True))
        rewards, infos = [], []
        for i, sample in enumerate(samples):
            reason, info = reasons[i], {}
            if reason is None:
                result = results[i]
                info = {
                    "energy_per_atom": result.energy_per_atom,
                    "energy_s": result.seconds,
                    "cached": result.cached,
                }
                reason = None if result.failure is None else f"failure:{result.failure}"
            if reason is None:
                try:
                    reward, extra = self.score(sample, result)
                    info.update(extra)
                except Exception as exc:
                    log.warning("%s: scoring %s failed: %r", self.name, sample.formula, exc)
                    reason, info["error"] = f"failure:score_{type(exc).__name__}", str(exc)[:500]
            if reason is not None:
                reward = self.penalties.value(reason, sample)
            info["penalty"] = reason
            rewards.append(float(reward))
            infos.append(info)
        return RewardOutput(rewards, infos)


class EnergyReward(PotentialReward):
    """reward = -E_tot: minus the potential energy per atom (eV/atom), or per cell (eV) with ``per_cell``.

    Lower energy is better, so the reward is the negated energy; MP-20 crystals give about +1..+10.
    Note the paper's penalty (-0.1) is only below valid rewards when energies are negative.
    """

    name = "etot"

    def __init__(
        self,
        potential: Potential,
        per_cell: bool = False,
        penalties: Penalties | PenaltyConfig | Mapping | None = None,
        guard: GuardConfig | None = None,
        cache_size: int = 100_000,
        relax_steps: int = 0,
        hull: EnergyToHull | None = None,
        volume_scan: Sequence[float] = (),
    ):
        super().__init__(potential, penalties, guard, cache_size, relax_steps, volume_scan)
        self.per_cell = per_cell
        # Only watched, never rewarded: E_hull of each scored structure in its info, so a run on E_tot shows
        # whether E_hull follows (the paper's reward-hack analysis). None: not watched.
        self.hull = hull

    def score(self, sample: Sample, result: EnergyResult) -> tuple[float, dict]:
        scale = len(result.structure) if self.per_cell else 1
        info = {}
        if self.hull is not None:
            try:
                info["e_above_hull"], _ = self.hull(result.structure, result.energy_per_atom)
            except Exception as exc:  # an element outside the hull; the reward stands without it
                log.debug("no E_hull for %s: %r", sample.formula, exc)
        return -result.energy_per_atom * scale, info

"""Post-generation relaxation (paper appendix A.2) with any ASE calculator, one structure or thousands.

``relax_structure``: E_0 = E(generated cell), then LBFGS on atoms and cell together (ASE
``FrechetCellFilter``: the cell is relaxed through the log of its deformation gradient, so stress and forces
share one convergence test) until every generalised force is below ``fmax`` (0.02 eV/A) or ``max_steps``
(100) steps were taken; E_1 = E(relaxed cell).

``relax_many`` runs that over many samples in worker processes (one per core by default; each loads its
calculator once and runs torch and BLAS on one thread, so W workers use W cores without oversubscription).
Every result is appended to a JSONL file keyed by sample id as soon as it arrives, so a killed run resumes
where it stopped: ids already in the file are skipped (a torn last line is dropped, see ``evaluation.jsonl``).
A structure never aborts the run: a cell the potential cannot handle (``crystals.guard.guard_structure``),
an exception or a non-finite energy, a worker that dies (segfault, out of memory) and a relaxation that runs
past ``timeout_s`` (its worker is killed and replaced) each become a record with ``ok: false`` and the
reason in ``error``.

Calculators come from ``RELAXERS``: a factory function run once in each worker plus the energy scale its
energies are on (needed to put them on the MP-20 hull, see ``crystals.hull``). Adding one is one factory and
one registry entry.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure

from crystals import potentials
from crystals.guard import GuardConfig, guard_structure
from evaluation.jsonl import JsonlAppender, read_jsonl

UMA_CHECKPOINT_ENV = "CRYSTAL_GRPO_UMA_CHECKPOINT"
_POLL_S = 0.5  # how often the pool looks at the clock for timeouts when no message arrives


@dataclass(frozen=True)
class RelaxConfig:
    """Paper defaults (appendix A.2); ``timeout_s`` bounds one structure in ``relax_many`` (None: no limit)."""

    fmax: float = 0.02  # eV/A, on forces and the filter's stress-derived cell forces
    max_steps: int = 100
    timeout_s: float | None = 600.0
    threads: int = 1  # torch and BLAS threads while relaxing (relax_many runs one process per core)

    def __post_init__(self) -> None:
        # max_steps 0 would report the generated cells as "relaxed" (a 100 % match with themselves); NaN fails
        rules = {
            "max_steps": (self.max_steps >= 1, ">= 1"),
            "threads": (self.threads >= 1, ">= 1"),
            "fmax": (self.fmax > 0, "> 0"),
            "timeout_s": (self.timeout_s is None or self.timeout_s > 0, "> 0 (unset: no limit)"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Relaxation:
    """Energies in eV (per cell; the ``_per_atom`` properties divide by the atom count)."""

    initial_energy: float  # the generated structure, before any step
    final_energy: float
    structure: Structure  # relaxed
    steps: int
    converged: bool  # forces below fmax within max_steps
    wall_s: float

    @property
    def initial_energy_per_atom(self) -> float:
        return self.initial_energy / len(self.structure)

    @property
    def final_energy_per_atom(self) -> float:
        return self.final_energy / len(self.structure)


@contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """torch and BLAS on at most ``n`` threads inside the block (restored afterwards).

    Small crystals are far too little work for several threads: LBFGS and the cell filter do 3x3 and
    3N x 3N linear algebra where OpenBLAS threads only spin, and CHGNet's graphs are tiny. On a busy 2-core
    machine a 2-atom relaxation took 48 s with torch's default threads and 2.6 s with one."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(previous)


def relax_structure(structure: Structure, calculator: Any, config: RelaxConfig = RelaxConfig()) -> Relaxation:
    """Relax ``structure`` with an ASE calculator; raises ``ValueError`` on a non-finite energy."""
    from ase import Atoms
    from ase.filters import FrechetCellFilter
    from ase.optimize import LBFGS

    start = time.perf_counter()
    atoms = Atoms(
        symbols=[site.specie.symbol for site in structure],
        positions=structure.cart_coords,
        cell=structure.lattice.matrix,
        pbc=True,
    )
    atoms.calc = calculator
    with limit_threads(config.threads):
        initial = float(atoms.get_potential_energy())
        if not math.isfinite(initial):
            raise ValueError(f"non-finite initial energy {initial}")
        optimizer = LBFGS(FrechetCellFilter(atoms), logfile=None)
        converged = bool(optimizer.run(fmax=config.fmax, steps=config.max_steps))
        final = float(atoms.get_potential_energy())
    if not math.isfinite(final):
        raise ValueError(f"non-finite energy {final} after {optimizer.nsteps} steps")
    relaxed = Structure(
        Lattice(np.array(atoms.cell)),
        atoms.get_chemical_symbols(),
        atoms.positions,
        coords_are_cartesian=True,
    )
    return Relaxation(initial, final, relaxed, optimizer.nsteps, converged, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------
# Calculators


@dataclass(frozen=True)
class Relaxer:
    """``factory(**options)`` builds the ASE calculator (in each worker); ``energy_scale`` is one of
    ``crystals.potentials.EnergyScale`` ("mp2020_corrected", "mp_uncorrected", "other")."""

    factory: Callable[..., Any]
    energy_scale: str
    description: str


def uma_calculator(checkpoint: str | Path | None = None, task_name: str = "omat", device: str = "cpu") -> Any:
    """UMA from a local checkpoint file (``checkpoint`` or $CRYSTAL_GRPO_UMA_CHECKPOINT); never downloads."""
    checkpoint = checkpoint or os.environ.get(UMA_CHECKPOINT_ENV)
    if not checkpoint or not Path(checkpoint).expanduser().is_file():
        where = f"{checkpoint} does not exist" if checkpoint else "no checkpoint given"
        raise FileNotFoundError(
            f"UMA needs a local checkpoint file ({where}). The weights are gated on Hugging Face: accept the "
            "licence at https://huggingface.co/facebook/UMA, run `huggingface-cli login`, then `huggingface-cli "
            "download facebook/UMA checkpoints/uma-s-1p1.pt --local-dir DIR` (the paper used uma-s-1p1), and "
            f"pass checkpoint=DIR/checkpoints/uma-s-1p1.pt or set {UMA_CHECKPOINT_ENV}. It also needs "
            "fairchem-core: pip install 'crystal-grpo[uma]'."
        )
    return potentials.uma_calculator(Path(checkpoint).expanduser(), task_name, device)


RELAXERS: dict[str, Relaxer] = {
    "chgnet": Relaxer(
        potentials.chgnet_calculator, "mp2020_corrected", "CHGNet 0.3.0 (default; weights ship with chgnet)"
    ),
    "sevenn": Relaxer(
        potentials.sevenn_calculator,
        "mp_uncorrected",
        "SevenNet-0, an independent MPtrj potential (extra: sevenn)",
    ),
    "uma": Relaxer(uma_calculator, "other", "UMA (paper's relaxer) from a local checkpoint (extra: uma)"),
}


def get_relaxer(name: str) -> Relaxer:
    if name not in RELAXERS:
        raise ValueError(f"unknown relaxer {name!r}; available: {', '.join(RELAXERS)}")
    return RELAXERS[name]


# ---------------------------------------------------------------------------------------------------------
# Records: one JSON object per sample id


def structure_from_record(record: dict) -> Structure | None:
    """The relaxed structure of a result record (None for a failure)."""
    return Structure.from_dict(record["structure"]) if record.get("structure") else None


def _record(sid: str, generated: Structure, settings: dict, **fields) -> dict:
    """A result record: id, settings, what was relaxed, and the outcome fields (``ok`` and ``error`` or the
    energies and the relaxed ``structure``)."""
    composition = generated.composition
    base = {"id": sid, **settings, "formula": composition.reduced_formula, "n_atoms": len(generated)}
    return {**base, "ok": False, "error": None, **fields}


def _relax_record(
    sid: str, structure: Structure, calculator: Any, config: RelaxConfig, settings: dict
) -> dict:
    """Relax one structure into a record; never raises (the failure is the record)."""
    start = time.perf_counter()
    try:
        reason = guard_structure(structure, GuardConfig(timeout_s=None))
        if reason is not None:
            return _record(sid, structure, settings, error=f"rejected: {reason}", wall_s=0.0)
        r = relax_structure(structure, calculator, config)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:500]
        return _record(sid, structure, settings, error=error, wall_s=time.perf_counter() - start)
    return _record(
        sid,
        structure,
        settings,
        ok=True,
        initial_energy=r.initial_energy,
        initial_energy_per_atom=r.initial_energy_per_atom,
        final_energy=r.final_energy,
        final_energy_per_atom=r.final_energy_per_atom,
        steps=r.steps,
        converged=r.converged,
        wall_s=r.wall_s,
        structure=r.structure.as_dict(),
    )


def _settings(relaxer: str, options: dict, config: RelaxConfig) -> dict:
    """What makes two results comparable; stored in every record and checked on resume."""
    return {
        "relaxer": relaxer,
        "relaxer_options": options,
        "fmax": config.fmax,
        "max_steps": config.max_steps,
    }


def load_results(path: str | Path) -> dict[str, dict]:
    """Records of a results file by sample id (a later record of an id replaces an earlier one)."""
    path = Path(path)
    return {r["id"]: r for r in read_jsonl(path)} if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------
# Worker processes


def _quiet_worker() -> None:
    """Workers share the parent's terminal, where the progress bar lives; failures are in the records."""
    import sys
    import warnings

    warnings.simplefilter("ignore")
    # CHGNet prints per structure, and to stderr of every cell with an isolated atom: hundreds of lines over
    # a run of generated cells, between the parent's progress lines
    sys.stdout = sys.stderr = open(os.devnull, "w")


def _worker_main(conn, relaxer: str, options: dict, config: RelaxConfig, settings: dict) -> None:
    """Build the calculator once, say "ready", then relax (id, structure) tasks until None or EOF."""
    try:
        _quiet_worker()
        try:
            calculator = get_relaxer(relaxer).factory(**options)
        except Exception as e:
            conn.send(("fatal", f"{type(e).__name__}: {e}"))
            return
        conn.send(("ready", None))
        while (task := conn.recv()) is not None:
            sid, structure = task
            conn.send(("done", _relax_record(sid, structure, calculator, config, settings)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping
        return


class _Worker:
    """A worker process, its pipe, and the task it runs: (id, structure, start time) or None."""

    def __init__(self, ctx, args: tuple):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, *args), daemon=True)
        self.process.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.ready = False
        self.task: tuple[str, Structure, float] | None = None

    def submit(self, sid: str, structure: Structure) -> None:
        self.conn.send((sid, structure))
        self.task = (sid, structure, time.monotonic())

    def drain(self) -> Iterator[tuple[str, Any]]:
        """Every message already in the pipe (stops at EOF: a dead worker has nothing more to say)."""
        try:
            while self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError):
            return

    def stop(self, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _run_pool(
    todo: list[tuple[str, Structure]],
    relaxer: str,
    options: dict,
    config: RelaxConfig,
    settings: dict,
    workers: int,
) -> Iterator[dict]:
    """Records of ``todo`` in completion order from ``workers`` processes (see module docstring)."""
    ctx = mp.get_context("spawn")  # fork after torch is loaded can deadlock; spawn starts clean
    args = (relaxer, options, config, settings)
    queue = deque(todo)
    pool = [_Worker(ctx, args) for _ in range(min(workers, len(todo)))]

    def replace(worker: _Worker) -> None:
        worker.stop(kill=True)
        pool.remove(worker)
        if queue:
            pool.append(_Worker(ctx, args))

    try:
        while queue or any(w.task for w in pool):
            for worker in list(pool):
                alive = worker.process.is_alive()  # before draining: all it sent before dying gets read
                for kind, payload in worker.drain():
                    if kind == "fatal":
                        raise RuntimeError(f"relaxer {relaxer!r} could not start: {payload}")
                    if kind == "done":
                        worker.task = None
                        yield payload
                    worker.ready = True
                if not alive:
                    if worker.task is None and not worker.ready:
                        raise RuntimeError(
                            f"a {relaxer} worker died on start (exit {worker.process.exitcode})"
                        )
                    if worker.task is not None:
                        sid, structure, _ = worker.task
                        error = f"worker died (exit code {worker.process.exitcode})"
                        yield _record(sid, structure, settings, error=error)
                    replace(worker)
                    continue
                if worker.task is not None and config.timeout_s is not None:
                    sid, structure, started = worker.task
                    elapsed = time.monotonic() - started
                    if elapsed > config.timeout_s:
                        error = f"timeout: no result after {elapsed:.0f} s (limit {config.timeout_s:g} s)"
                        yield _record(sid, structure, settings, error=error, wall_s=elapsed)
                        replace(worker)
                        continue
                if worker.ready and worker.task is None and queue:
                    worker.submit(*queue.popleft())
            wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=_POLL_S)
    finally:
        for worker in pool:
            worker.stop()


def _run_serial(
    todo: list[tuple[str, Structure]], relaxer: str, options: dict, config: RelaxConfig, settings: dict
) -> Iterator[dict]:
    """In this process, one after another: no timeout and no crash isolation (for debugging)."""
    if not todo:
        return
    calculator = get_relaxer(relaxer).factory(**options)
    for sid, structure in todo:
        yield _relax_record(sid, structure, calculator, config, settings)


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def relax_many(
    items: Iterable[tuple[str, Structure]],
    results_path: str | Path,
    *,
    relaxer: str = "chgnet",
    relaxer_options: dict | None = None,
    config: RelaxConfig = RelaxConfig(),
    workers: int | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Relax every (id, structure) whose id is not yet in ``results_path`` (failures count as done unless
    ``retry_failed``) and append the records there. Returns all records of the file by id.

    ``workers``: processes (default: one per core); 0 runs in this process without timeouts or crash
    isolation. Raises ``ValueError`` when the file holds results of other settings (relaxer, options, fmax,
    max_steps): mixing them would make the numbers meaningless.
    """
    get_relaxer(relaxer)  # unknown names fail here, before any process starts
    workers = default_workers() if workers is None else workers
    if workers < 0:  # an empty pool would wait for results forever
        raise ValueError(f"workers must be >= 0 (0: in this process), got {workers}")
    options = json.loads(json.dumps(relaxer_options or {}, default=str))  # as the records store them
    settings = _settings(relaxer, options, config)
    items = list(items)
    ids = [sid for sid, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    done = load_results(results_path)
    for record in done.values():
        other = {k: record.get(k) for k in settings}
        if other != settings:
            raise ValueError(f"{results_path} holds results of other settings ({other}, now {settings})")
    finished = {sid for sid, r in done.items() if r["ok"] or not retry_failed}
    # largest first: the long relaxations start early instead of leaving one worker busy at the end
    todo = sorted(((sid, s) for sid, s in items if sid not in finished), key=lambda item: -len(item[1]))
    runner = (
        _run_serial(todo, relaxer, options, config, settings)
        if workers == 0
        else _run_pool(todo, relaxer, options, config, settings, workers)
    )
    with (
        JsonlAppender(results_path) as out,
        _ProgressBar(progress, len(items), len(items) - len(todo)) as bar,
    ):
        failures = 0
        for record in runner:
            out.write(record)
            failures += not record["ok"]
            bar.advance(failures)
    return load_results(results_path)  # as stored (JSON types), whether relaxed now or before


class _ProgressBar:
    """A rich progress bar with ETA counting relaxed structures (already done ones start it off)."""

    def __init__(self, enabled: bool, total: int, completed: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]relax[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task("failed 0", total=total, completed=completed)

    def advance(self, failures: int) -> None:
        self.progress.update(self.task, advance=1, description=f"failed {failures}")

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

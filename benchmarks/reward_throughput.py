"""Reward throughput (structures per second) on MP-20 test structures written as model text.

Measured on the same N texts (paper's one-line format, 2-decimal coordinates), each reward cold (empty cache):

- parse + validity: ``CrystalTextReward(PenaltyReward())``: parse, atom count, covalent overlap rule;
- CHGNet -E_tot at each batch size of a sweep (batch 1 is "one structure at a time"); the headline ratio is
  batched (``batch_size``) over one at a time (target >= 3x); plus the batched reward's second pass (every
  structure a cache hit);
- CHGNet batched by atom count (structures of 1-4, 5-8, 9-12, 13-20 atoms): structures/s and atoms/s;
- E_hull reward (CHGNet batched + formation energy + MP-20 hull);
- relaxation per structure (LBFGS + FrechetCellFilter, fmax 0.02, the evaluation's settings) with CHGNet,
  and with SevenNet when ``sevenn`` is importable.

    python -m benchmarks.reward_throughput [--quick] [--data-dir DIR] [--n N] [--batch-size B] [--device D]
                                            [--out FILE.json]

Without ``--data-dir`` (or $CRYSTAL_GRPO_DATA) the packaged MP-20 subset and hull are used.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.common import write_result
from crystals.data import iter_split
from crystals.text import format_structure
from evaluation.relax import RelaxConfig, get_relaxer, relax_structure
from rewards.base import CrystalTextReward
from rewards.chgnet_energy import CHGNetEnergyReward
from rewards.ehull import EHullReward
from rewards.penalties import PenaltyReward

ATOM_BINS = ((1, 4), (5, 8), (9, 12), (13, 20))
RELAXERS = ("chgnet", "sevenn")


@dataclass
class RewardBenchConfig:
    n: int = 64
    batch_size: int = 32  # the batched figure; must be one of batch_sizes
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    per_atom_bin: int = 16  # structures per atom-count bin
    relax_n: int = 4
    relax_steps: int = 100
    device: str = "cpu"
    data_dir: str | None = None


QUICK = RewardBenchConfig(n=8, batch_size=8, batch_sizes=(1, 8), per_atom_bin=4, relax_n=1, relax_steps=10)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rate(reward: CrystalTextReward, metas: list[dict], texts: list[str]) -> float:
    """Structures per wall-clock second of one call over all texts."""
    return len(texts) / timed(lambda: reward(metas, texts))


def load_texts(split: str, data_dir: str | None, limit: int | None) -> list[tuple[dict, str, int]]:
    """(meta, text, atom count) of the first ``limit`` structures of a split."""
    return [
        ({"formula": r.formula}, format_structure(r.structure), len(r.structure))
        for r in iter_split(split, data_dir, limit=limit)
    ]


def relaxation_rows(structures: list, cfg: RewardBenchConfig) -> list[dict]:
    """Seconds and optimizer steps per relaxed structure, per available relaxer."""
    names = [name for name in RELAXERS if importlib.util.find_spec(name)]
    config = RelaxConfig(max_steps=cfg.relax_steps)
    rows = []
    for name in names:
        calculator = get_relaxer(name).factory(device=cfg.device)
        relax_structure(structures[0], calculator, RelaxConfig(max_steps=1))  # warm-up: first call is slower
        runs = [relax_structure(s, calculator, config) for s in structures]
        seconds = sum(r.wall_s for r in runs)
        steps = sum(r.steps for r in runs)
        rows.append(
            {
                "relaxer": name,
                "structures": len(runs),
                "s_per_structure": seconds / len(runs),
                "steps_per_structure": steps / len(runs),
                "ms_per_step": 1000 * seconds / max(1, steps),
                "atoms_mean": sum(len(s) for s in structures) / len(structures),
            }
        )
    return rows


def run(cfg: RewardBenchConfig | None = None) -> dict:
    cfg = cfg or RewardBenchConfig()
    if cfg.batch_size not in cfg.batch_sizes or 1 not in cfg.batch_sizes:
        raise ValueError("batch_sizes must hold 1 and batch_size")
    pool = load_texts("test", cfg.data_dir, None)
    rows = pool[: cfg.n]
    metas, texts = [m for m, _, _ in rows], [t for _, t, _ in rows]

    out: dict = {"config": asdict(cfg), "n": len(texts)}
    out["parse_validity_per_s"] = rate(CrystalTextReward(PenaltyReward()), metas, texts)

    sweep = {}
    for batch in cfg.batch_sizes:
        reward = CrystalTextReward(CHGNetEnergyReward(batch_size=batch, device=cfg.device))
        if batch == cfg.batch_sizes[0]:
            reward(metas[:1], texts[:1])  # loads CHGNet once (cached per process) outside any timing
            reward = CrystalTextReward(CHGNetEnergyReward(batch_size=batch, device=cfg.device))
        sweep[batch] = rate(reward, metas, texts)
        if batch == cfg.batch_size:
            out["chgnet_cached_per_s"] = rate(reward, metas, texts)
    out["chgnet_per_s_by_batch"] = sweep
    out["chgnet_batched_per_s"] = sweep[cfg.batch_size]
    out["chgnet_one_at_a_time_per_s"] = sweep[1]
    out["chgnet_batched_over_one"] = sweep[cfg.batch_size] / sweep[1]
    out["target_batched_over_one"] = 3.0

    by_atoms, missing = [], {}
    for low, high in ATOM_BINS:
        picked = [(m, t, k) for m, t, k in pool if low <= k <= high][: cfg.per_atom_bin]
        if not picked:
            missing[f"chgnet-atoms/{low}-{high}"] = f"no test structure with {low}-{high} atoms"
            continue
        reward = CrystalTextReward(CHGNetEnergyReward(batch_size=cfg.batch_size, device=cfg.device))
        per_s = rate(reward, [m for m, _, _ in picked], [t for _, t, _ in picked])
        atoms = sum(k for _, _, k in picked) / len(picked)
        by_atoms.append(
            {
                "atoms": f"{low}-{high}",
                "structures": len(picked),
                "per_s": per_s,
                "atoms_per_s": per_s * atoms,
            }
        )
    out["chgnet_batched_by_atoms"] = by_atoms

    # The hull is loaded once, outside the timing; the timed reward shares it but starts with an empty cache.
    hull = EHullReward(batch_size=cfg.batch_size, device=cfg.device, data_dir=cfg.data_dir).hull
    ehull = CrystalTextReward(EHullReward(hull=hull, batch_size=cfg.batch_size, device=cfg.device))
    out["ehull_batched_per_s"] = rate(ehull, metas, texts)

    structures = [r.structure for r in iter_split("test", cfg.data_dir, limit=cfg.relax_n)]
    out["relaxation"] = relaxation_rows(structures, cfg)
    missing |= {
        f"relax/{name}": f"{name} not installed" for name in RELAXERS if not importlib.util.find_spec(name)
    }
    out["missing"] = missing
    return out


def row_keys(result: dict) -> set[str]:
    """The rows present: each CHGNet batch size, the parse, E_hull and atom-bin rows, each relaxer."""
    keys = {"parse", "ehull", *(f"chgnet/{b}" for b in result["chgnet_per_s_by_batch"])}
    keys |= {f"chgnet-atoms/{row['atoms']}" for row in result["chgnet_batched_by_atoms"]}
    return keys | {f"relax/{row['relaxer']}" for row in result["relaxation"]}


def print_result(result: dict) -> None:
    print(f"{result['n']} MP-20 test structures")
    print(f"parse + validity            {result['parse_validity_per_s']:10.1f} structures/s")
    for batch, per_s in result["chgnet_per_s_by_batch"].items():
        print(f"CHGNet E_tot batch {int(batch):<4d}      {per_s:10.2f} structures/s")
    print(f"CHGNet cached (2nd pass)    {result['chgnet_cached_per_s']:10.1f} structures/s")
    print(f"CHGNet batched / one        {result['chgnet_batched_over_one']:10.2f} x (target >= 3)")
    for row in result["chgnet_batched_by_atoms"]:
        print(
            f"CHGNet batched, {row['atoms']:>5s} atoms {row['per_s']:8.2f} structures/s {row['atoms_per_s']:8.1f} atoms/s"
        )
    print(f"E_hull batched              {result['ehull_batched_per_s']:10.2f} structures/s")
    for row in result["relaxation"]:
        print(
            f"relax {row['relaxer']:8s} {row['s_per_structure']:6.2f} s/structure, "
            f"{row['steps_per_structure']:.0f} steps, {row['ms_per_step']:.0f} ms/step"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 structures, short relaxations")
    parser.add_argument("--n", type=int, default=None, help="number of structures (overrides --quick)")
    parser.add_argument("--data-dir", default=os.environ.get("CRYSTAL_GRPO_DATA"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else RewardBenchConfig(), data_dir=args.data_dir, device=args.device)
    if args.n:
        cfg = replace(cfg, n=args.n)
    if args.batch_size:
        cfg = replace(
            cfg, batch_size=args.batch_size, batch_sizes=tuple(sorted({*cfg.batch_sizes, args.batch_size}))
        )
    result = run(cfg)
    print_result(result)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()


def markdown(result: dict) -> str:
    cfg = result["config"]
    ratio = result["chgnet_batched_over_one"]
    verdict = "met" if ratio >= result["target_batched_over_one"] else "**missed**"
    lines = [
        "### Rewards",
        "",
        f"{result['n']} MP-20 test structures as model text, each reward cold (empty cache).",
        "",
        "| reward | structures/s | note |",
        "| --- | --- | --- |",
        f"| parse + validity | {result['parse_validity_per_s']:.0f} | |",
    ]
    for batch, per_s in result["chgnet_per_s_by_batch"].items():
        note = (
            "one at a time"
            if int(batch) == 1
            else f"{per_s / result['chgnet_one_at_a_time_per_s']:.1f}x one at a time"
        )
        lines.append(f"| CHGNet -E_tot, batch {batch} | {per_s:.2f} | {note} |")
    lines += [
        f"| CHGNet -E_tot, cached (2nd pass) | {result['chgnet_cached_per_s']:.0f} | |",
        f"| E_hull, batch {cfg['batch_size']} | {result['ehull_batched_per_s']:.2f} | CHGNet + formation energy + hull |",
        "",
        f"Batched CHGNet (batch {cfg['batch_size']}) / one at a time: {ratio:.1f}x (target >= 3x: {verdict}).",
        "",
        "| atoms | structures | structures/s | atoms/s |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["chgnet_batched_by_atoms"]:
        lines.append(
            f"| {row['atoms']} | {row['structures']} | {row['per_s']:.2f} | {row['atoms_per_s']:.0f} |"
        )
    lines += [
        "",
        f"| relaxer (LBFGS + FrechetCellFilter, fmax 0.02, <= {cfg['relax_steps']} steps) | s per structure | "
        "steps | ms per step |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["relaxation"]:
        lines.append(
            f"| {row['relaxer']} ({row['structures']} structures, {row['atoms_mean']:.1f} atoms) | "
            f"{row['s_per_structure']:.2f} | {row['steps_per_structure']:.0f} | {row['ms_per_step']:.0f} |"
        )
    lines += [f"- missing {row}: {reason}" for row, reason in result["missing"].items()]
    return "\n".join(lines)

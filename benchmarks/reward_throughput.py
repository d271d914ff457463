"""Reward throughput (structures per second) on MP-20 test structures written as model text.

Measured stages, each on the same N texts (paper's one-line format, 2-decimal coordinates):

- parse + validity: ``CrystalTextReward(PenaltyReward())``: parse, atom count, covalent overlap rule;
- CHGNet -E_tot, batched (``batch_size``) vs one structure at a time (``batch_size=1``), both cold
  (empty cache); plus the same batch again (every structure a cache hit);
- E_hull reward (CHGNet batched + formation energy + MP-20 hull), cold.

    python -m benchmarks.reward_throughput [--quick] [--data-dir DIR] [--n N] [--batch-size B] [--device D]
                                            [--out FILE.json]

``--quick`` scores 32 structures (the default is 256). Needs the full data directory (mp20/ and hull/);
the first E_hull run builds the hull cache (~75 s). Numbers depend on the machine and its load: report
them with the CPU/GPU and torch thread count printed at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from crystals.data import iter_split
from crystals.text import format_structure
from rewards.base import CrystalTextReward
from rewards.chgnet_energy import CHGNetEnergyReward
from rewards.ehull import EHullReward
from rewards.penalties import PenaltyReward


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 structures instead of 256")
    parser.add_argument("--n", type=int, default=None, help="number of structures (overrides --quick)")
    parser.add_argument("--data-dir", default=os.environ.get("CRYSTAL_GRPO_DATA"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n = args.n or (32 if args.quick else 256)

    texts, metas = [], []
    for record in iter_split("test", args.data_dir, limit=n):
        texts.append(format_structure(record.structure))
        metas.append({"formula": record.formula})
    print(
        f"{len(texts)} MP-20 test structures; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {args.device}"
    )

    rows: dict[str, float] = {}

    def run(label: str, reward: CrystalTextReward) -> None:
        seconds = timed(lambda: reward(metas, texts))
        rows[label] = len(texts) / seconds
        print(f"{label:<34} {rows[label]:10.1f} structures/s  ({seconds:.2f} s)", flush=True)

    run("parse + validity", CrystalTextReward(PenaltyReward()))
    batched = CrystalTextReward(CHGNetEnergyReward(batch_size=args.batch_size, device=args.device))
    run(f"CHGNet E_tot batched ({args.batch_size})", batched)
    run("CHGNet E_tot cached (2nd pass)", batched)
    run("CHGNet E_tot one at a time", CrystalTextReward(CHGNetEnergyReward(batch_size=1, device=args.device)))
    ehull = EHullReward(batch_size=args.batch_size, device=args.device, data_dir=args.data_dir)
    run(f"E_hull batched ({args.batch_size})", CrystalTextReward(ehull))
    if args.out:
        args.out.write_text(json.dumps({"n": len(texts), "structures_per_s": rows}, indent=2))


if __name__ == "__main__":
    main()

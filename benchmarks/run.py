"""Run all benchmarks, or some by name, and write ``results.json`` and ``results.md`` (tables plus machine info).

    python -m benchmarks.run [NAME ...] [--quick] [--out DIR]

Names: grpo_step (ours vs TRL, each with HF and vLLM generation), rollout (HF vs vLLM generation, and the
cost of each constraint), reward (parse, CHGNet, E_hull, relaxation), weight_sync (trainer -> vLLM, in process
and to a worker, as a share of our step). ``--quick`` runs the small configurations (about 4 minutes on 2
cores; the smoke test runs it); the default configurations take about 2 hours on 2 loaded CPU cores (most of
it the step benchmark's HF generate). Targets are reported, never asserted: a missed target is marked in the
table, and a row that could not run is listed as missing, with the reason.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import grpo_step, reward_throughput, rollout, weight_sync
from benchmarks.common import machine_info

BENCHMARKS: dict[str, ModuleType] = {
    "grpo_step": grpo_step,
    "rollout": rollout,
    "reward": reward_throughput,
    "weight_sync": weight_sync,
}


def machine_markdown(machine: dict, quick: bool, seconds: dict[str, float]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    return "\n".join(
        [
            "## Benchmarks" + (" (quick)" if quick else ""),
            "",
            f"- machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
            f"GPU {machine['gpu'] or 'none'}, load average {machine['load_average_1m']:.1f} at the start",
            f"- versions: Python {machine['python']}, {versions}",
            f"- run {machine['date_utc']} UTC: {timing}",
        ]
    )


def run_benchmarks(
    names: Sequence[str] | None = None,
    quick: bool = False,
    out_dir: str | Path = "bench",
    threads: int | None = None,
) -> Path:
    """Run the named benchmarks (all when ``names`` is empty or None) and write ``out_dir/results.json`` and
    ``out_dir/results.md``; returns the Markdown file's path. ``threads`` sets torch's thread count (default:
    torch's own choice, one per core)."""
    if threads:
        torch.set_num_threads(threads)
    names = list(names or BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    results: dict = {"quick": quick, "machine": machine, "seconds": {}, "results": {}}
    for name in names:
        module = BENCHMARKS[name]
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        result = module.run(module.QUICK if quick else None)
        module.print_result(result)
        results["results"][name] = result
        results["seconds"][name] = time.perf_counter() - start
        # written after every benchmark, so a long run that dies keeps what it finished
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sections = [machine_markdown(machine, quick, results["seconds"])]
    sections += [BENCHMARKS[name].markdown(result) for name, result in results["results"].items()]
    markdown = out_dir / "results.md"
    markdown.write_text("\n\n".join(sections) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small configurations, about 4 minutes")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output directory (default ./bench)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = parser.parse_args(argv)
    path = run_benchmarks(args.names, args.quick, args.out, args.threads)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()

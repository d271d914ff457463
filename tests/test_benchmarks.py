"""Smoke test of the benchmark runner: the --quick run of every benchmark writes JSON and Markdown holding
finite, positive figures, and every row its configuration asks for, or the reason it is missing. Timings are
never asserted (the machine is shared and noisy)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import grpo_step, reward_throughput, rollout, weight_sync
from benchmarks.run import BENCHMARKS

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def numbers(tree) -> list[float]:
    """Every int or float leaf of a JSON tree (booleans excluded)."""
    if isinstance(tree, dict):
        return [x for value in tree.values() for x in numbers(value)]
    if isinstance(tree, list):
        return [x for value in tree for x in numbers(value)]
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return [float(tree)]
    return []


def expected_rows(name: str, config: dict) -> set[str]:
    """The rows a benchmark's configuration asks for, spelled as its ``row_keys`` spells them."""
    if name == "grpo_step":
        return {f"{v}/{side}" for v in config["variants"] for side in config["sides"]}
    if name == "rollout":
        rows = {f"{g}/{b}" for g in ("hf", "vllm") for b in config["batch_sizes"]}
        rows |= {f"constraint/{g}/{m}" for g in ("hf", "vllm") for m in config["constraints"]}
        if config["separation"]:  # the HF-only modes of the formula grammar with crystals' token rules
            rows.add("constraint/hf/formula+separation")
            if config["volume_floor"] or config["volume_ceiling"]:
                rows.add("constraint/hf/formula+volume+separation")
        return rows
    if name == "weight_sync":
        return {f"{size}/{mode}" for size in config["sizes"] for mode in config["modes"]}
    assert name == "reward"
    rows = {"parse", "ehull", *(f"chgnet/{b}" for b in config["batch_sizes"])}
    rows |= {f"chgnet-atoms/{low}-{high}" for low, high in reward_throughput.ATOM_BINS}
    return rows | {f"relax/{r}" for r in reward_throughput.RELAXERS}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks.run --quick` in its own process: the vLLM engines it starts must not live on in
    the test process (a later engine in the same process can fail inside vLLM)."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results.md", json.loads((out / "results.json").read_text())


def test_quick_run_writes_json_and_markdown_with_finite_positive_figures(quick_run):
    markdown, data = quick_run
    assert markdown.name == "results.md" and markdown.exists()
    assert set(data["results"]) == set(BENCHMARKS)
    assert all(math.isfinite(x) for x in numbers(data))

    step = data["results"]["grpo_step"]
    headline = []
    for summary in step["variants"].values():
        ours = summary["sides"]["ours-hf"]
        headline += [ours["step_s"]["median"], ours["response_tokens"]["median"], ours["peak_rss_mb"]["max"]]
        headline += [ours[f"{phase}_s"]["median"] for phase in ("generate", "logprob", "update")]
        headline += [*summary["gemm_flops"].values(), ours["update_flops"]["median"]]
        check = summary["update_check"]["ours-hf"]
        assert check["optimizer_steps_per_grpo_step"] == 1 and check["max_weight_change"] > 0

    hf_rows = [r for r in data["results"]["rollout"]["rows"] if r["generator"] == "hf"]
    assert [r["batch"] for r in hf_rows] == list(data["results"]["rollout"]["config"]["batch_sizes"])
    headline += [r[k] for r in hf_rows for k in ("tokens_per_s", "samples_per_s")]
    headline += [r["work_per_s"] for r in data["results"]["rollout"]["constraint_rows"]]

    reward = data["results"]["reward"]
    headline += [reward[k] for k in ("parse_validity_per_s", "chgnet_batched_per_s", "ehull_batched_per_s")]
    headline += [reward["chgnet_one_at_a_time_per_s"], reward["chgnet_batched_over_one"]]
    headline += [row["per_s"] for row in reward["chgnet_batched_by_atoms"]]
    headline += [row["s_per_structure"] for row in reward["relaxation"]]
    headline += [row["ms"]["median"] for row in data["results"]["weight_sync"]["rows"]]
    assert all(x > 0 for x in headline), headline

    text = markdown.read_text()
    for heading in (
        "## Benchmarks (quick)",
        "### GRPO step",
        "### Rollout",
        "### Rewards",
        "### Weight sync",
    ):
        assert heading in text
    assert re.search(r"\bnan\b|\binf\b", text, flags=re.IGNORECASE) is None


@pytest.mark.parametrize(
    "name, module",
    [
        ("grpo_step", grpo_step),
        ("rollout", rollout),
        ("weight_sync", weight_sync),
        ("reward", reward_throughput),
    ],
)
def test_every_row_is_there_or_says_why_not(quick_run, name, module):
    _, data = quick_run
    result = data["results"][name]
    present, missing = module.row_keys(result), result["missing"]
    for row in expected_rows(name, result["config"]):
        assert row in present or (isinstance(missing.get(row), str) and missing[row].strip()), (row, missing)
    assert not present & set(missing), present & set(missing)  # a row is there or missing, never both
    assert all(f"missing {row}: {reason}" in markdown_of(data, name) for row, reason in missing.items())


def markdown_of(data: dict, name: str) -> str:
    return BENCHMARKS[name].markdown(data["results"][name])


def test_trl_side_by_side(quick_run):
    if importlib.util.find_spec("trl") is None:
        pytest.skip(
            "trl is not installed (extra `bench`): the TRL half of the GRPO step benchmark was skipped"
        )
    _, data = quick_run
    for variant, summary in data["results"]["grpo_step"]["variants"].items():
        assert {"ours-hf", "trl-hf"} <= set(summary["sides"]), variant
        for side in ("ours-hf", "trl-hf"):
            check = summary["update_check"][side]
            assert check["optimizer_steps_per_grpo_step"] == 1 and check["max_weight_change"] > 0
        # equal work: a fixed-length variant gives every side max_new_tokens tokens per response
        if variant.startswith("fixed"):
            samples = summary["task"]["samples_per_step"]
            full = samples * data["results"]["grpo_step"]["config"]["max_new_tokens"]
            assert all(s["response_tokens"]["min"] == full for s in summary["sides"].values())
            assert all(s["cap_rate"]["max"] == 1 for s in summary["sides"].values())
        step = summary["pairings"]["ours-hf / trl-hf"]["step_s"]
        assert len(step["per_repeat"]) == data["results"]["grpo_step"]["config"]["repeats"]
        assert step["verdict"] in ("faster", "slower", "tie") and step["min"] <= step["median"] <= step["max"]


def test_the_best_variant_takes_each_sides_fastest_dtype_of_that_length():
    def summary(**step_s):
        return {"sides": {side.replace("_", "-"): {"step_s": {"median": s}} for side, s in step_s.items()}}

    variants = {
        "fixed-float32": summary(ours_hf=2.0, trl_hf=1.0),
        "fixed-bfloat16": summary(ours_hf=1.0, trl_hf=3.0),
        "sampled-bfloat16": summary(ours_hf=9.0, trl_hf=0.1),  # another length: not compared
    }
    chosen = grpo_step.best_dtypes(variants, "fixed", ["ours-hf", "trl-hf", "ours-vllm"])
    assert chosen == {"ours-hf": "bfloat16", "trl-hf": "float32", "ours-vllm": "float32"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_the_gpu_check_stops_at_once_without_a_gpu():
    """benchmarks/gpu_check.sh on a CPU-only machine: exit 2 with a one-line reason, before building anything."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        done.stderr.strip()
        == f"gpu check: cannot run: no CUDA device here (torch {torch.__version__}); "
        + ("the GPU check needs one GPU")
    )


def test_the_gpu_check_runs_end_to_end_at_a_toy_size_on_the_cpu(tmp_path):
    """The GPU check's own code, run where no GPU is (tiny shape, CPU, gloo, no vLLM), so that it is known to
    run before a GPU is lent: both compute dtypes train the fp32 masters, the one-rank torchrun launch shards
    and trains, and the JSON holds the per-phase bf16 ratio."""
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--shape", "tiny"]
    done = subprocess.run(
        [*command, "--steps", "2", "--no-vllm", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    for dtype in ("float32", "bfloat16"):
        assert len(result[f"grpo_steps_{dtype}"]) == 2
        assert result[f"masters_moved_{dtype}"] > 0.9
        assert result[f"master_dtypes_{dtype}"] == ["torch.float32"]
    sharded = result["sharded"]
    assert (sharded["backend"], sharded["reference_shards_on"]) == ("gloo", "cpu")
    assert sharded["masters_moved"] > 0.9 and sharded["master_dtypes"] == ["torch.float32"]
    assert "step" in result["bf16_speedup"] and result["vllm"].startswith("not run")
    assert result["passed"] is True and done.stdout.strip().endswith("gpu check passed")

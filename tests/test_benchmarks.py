"""Smoke test of the benchmark runner: the --quick run of every benchmark writes JSON and Markdown holding
finite, positive figures. Timings are never asserted (the machine is shared and noisy)."""

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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks.run --quick` in its own process: the vLLM engines it starts must not live on in
    the test process (a later engine in the same process can fail inside vLLM)."""
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results.md", json.loads((out / "results.json").read_text())


def test_quick_run_writes_json_and_markdown_with_finite_positive_figures(quick_run):
    markdown, data = quick_run
    assert markdown.name == "results.md" and markdown.exists()
    assert set(data["results"]) == set(BENCHMARKS)
    assert all(math.isfinite(x) for x in numbers(data))

    ours = data["results"]["grpo_step"]["ours"]
    headline = [ours["step_s"]["median"], ours["tokens_per_s"]["median"], ours["peak_rss_mb"]["max"]]
    headline += [ours[f"{phase}_s"]["median"] for phase in ("generate", "logprob", "update")]
    check = data["results"]["grpo_step"]["update_check"]["ours"]
    assert check["optimizer_steps_per_grpo_step"] == 1 and check["max_weight_change"] > 0

    hf_rows = [r for r in data["results"]["rollout"]["rows"] if r["generator"] == "hf"]
    assert [r["batch"] for r in hf_rows] == list(data["results"]["rollout"]["config"]["batch_sizes"])
    headline += [r[k] for r in hf_rows for k in ("tokens_per_s", "samples_per_s")]

    reward = data["results"]["reward"]
    headline += [reward[k] for k in ("parse_validity_per_s", "chgnet_batched_per_s", "ehull_batched_per_s")]
    headline += [reward["chgnet_one_at_a_time_per_s"], reward["chgnet_batched_over_one"]]
    headline += [row["per_s"] for row in reward["chgnet_batched_by_atoms"]]
    headline += [row["s_per_structure"] for row in reward["relaxation"]]
    assert all(x > 0 for x in headline), headline

    sync = data["results"]["weight_sync"]
    assert sync["rows"] or sync["note"]  # no rows: the note says why (no vLLM, or an engine that failed)

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


def test_trl_side_by_side(quick_run):
    if importlib.util.find_spec("trl") is None:
        pytest.skip(
            "trl is not installed (extra `bench`): the TRL half of the GRPO step benchmark was skipped"
        )
    _, data = quick_run
    step = data["results"]["grpo_step"]
    assert step["update_check"]["same_update"] is True
    assert step["trl"]["step_s"]["median"] > 0
    assert all(v > 0 for v in step["ratio_ours_over_trl"].values())


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

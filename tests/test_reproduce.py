"""`crystal-grpo reproduce --scale tiny`: every stage end to end on the packaged data, killed after its first
arm and resumed, then its report and its refusals.

The pipeline test runs the real console script in a subprocess, SIGKILLs it once the first arm has finished,
runs it again with the same --out and checks that no finished stage was redone and that every arm's numbers
landed in the report with their intervals.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.reproduce import load_arms, reproduce_preset
from pipeline.runs import constraint_label

runner = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).with_name("crystal-grpo")


def command(out: Path, *extra: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), "reproduce", "--scale", "tiny", "--out", str(out), *extra]


def stages(out: Path) -> dict:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def packaged_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CRYSTAL_GRPO_DATA"}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict, str]:
    """Run the tiny reproduction, kill it after its first arm, resume it; (out, stages at the kill, output)."""
    out = tmp_path_factory.mktemp("reproduce") / "run"
    process = subprocess.Popen(
        command(out), env=packaged_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 900
    first_arm = lambda: any(k.startswith("arm:") for k in stages(out))  # noqa: E731
    while not first_arm() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    killed = stages(out)
    assert any(k.startswith("arm:") for k in killed), "the run died or timed out before its first arm"
    resumed = subprocess.run(command(out), env=packaged_env(), capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out, killed, resumed.stdout + resumed.stderr


def test_every_arm_and_stage_finishes_and_nothing_finished_is_redone(resumed):
    out, killed, _ = resumed
    final = stages(out)
    _, arms = load_arms(reproduce_preset("tiny"), [])
    expected = {"sft-model", "evaluate", "rescore", "report", *(f"arm:{name}" for name in arms)}
    assert expected <= set(final)
    for name, record in killed.items():
        assert final[name] == record, f"stage {name} was redone after the resume"


def test_each_trained_arm_has_its_run_directory_and_every_arm_its_samples(resumed):
    out, _, _ = resumed
    _, arms = load_arms(reproduce_preset("tiny"), [])
    for name, configs in arms.items():
        records = [json.loads(line) for line in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        label = constraint_label(configs["run"])  # e.g. "formula + separation 0.5"
        assert records and all(r["constraint"] == label for r in records)
        if configs["reproduce"].policy == "rl":
            assert (out / "arms" / name / "final_model" / "model.safetensors").is_file()
            saved = (out / "arms" / name / "config.toml").read_text()
            assert f'name = "{configs["reward"].name}"' in saved


def test_report_holds_every_arm_with_intervals_and_the_comparisons(resumed):
    out, _, _ = resumed
    report = json.loads((out / "report" / "reproduction.json").read_text())
    _, arms = load_arms(reproduce_preset("tiny"), [])
    assert set(report["arms"]) == set(arms)
    for metrics in report["arms"].values():
        rate = metrics["parse rate (%)"]
        assert rate["n"] > 0 and rate["low"] <= rate["value"] <= rate["high"]
        assert all(math.isnan(v) or 0 <= v <= 1 for v in (rate["low"], rate["value"], rate["high"]))
    trained = {name for name, c in arms.items() if c["reproduce"].policy == "rl"}
    assert set(report["comparisons"]) == trained
    markdown = (out / "report" / "reproduction.md").read_text()
    assert "Trained arms against their baselines" in markdown and "sevenn" in markdown


def test_a_changed_setting_is_refused_naming_it(resumed, tmp_path):
    out, _, _ = resumed
    result = runner.invoke(
        app, ["reproduce", "--scale", "tiny", "--out", str(out), "--set", "grpo.lr=0.5", "--arm", "sft"]
    )
    assert result.exit_code == 1 and "grpo.lr" in result.output and "Traceback" not in result.output


def test_unknown_arm_and_scale_are_one_line_errors(tmp_path):
    result = runner.invoke(
        app, ["reproduce", "--scale", "tiny", "--out", str(tmp_path / "r"), "--arm", "nope"]
    )
    assert result.exit_code == 1 and "unknown arm(s) ['nope']" in result.output
    result = runner.invoke(app, ["reproduce", "--scale", "huge", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "unknown scale 'huge'" in result.output


def test_partial_reports_the_finished_arms_and_the_full_run_adds_the_rest(resumed, tmp_path):
    """`--partial` evaluates and reports the arms done so far without running the others; the evaluation
    stages remember which arms they took in, so the full run evaluates again with every arm, relaxing only
    the samples it had not relaxed."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(resumed[0], out)
    _, arms = load_arms(reproduce_preset("tiny"), [])
    log = stages(out)
    del log["arm:sft"]
    (out / "stages.json").write_text(json.dumps(log))
    (out / "samples" / "sft.jsonl").unlink()
    relaxed = (out / "report" / "relax-chgnet.jsonl").read_text().splitlines()
    kept = [line for line in relaxed if not json.loads(line)["id"].startswith("sft/")]
    (out / "report" / "relax-chgnet.jsonl").write_text("".join(line + "\n" for line in kept))

    result = runner.invoke(app, ["reproduce", "--scale", "tiny", "--out", str(out), "--partial"])
    assert result.exit_code == 0, result.output
    assert not (out / "samples" / "sft.jsonl").exists()  # no arm ran
    partial = json.loads((out / "report" / "reproduction.json").read_text())
    assert set(partial["arms"]) == set(arms) - {"sft"}
    assert stages(out)["evaluate"]["covers"] == [name for name in arms if name != "sft"]
    assert len((out / "report" / "relax-chgnet.jsonl").read_text().splitlines()) == len(kept)

    result = runner.invoke(app, ["reproduce", "--scale", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    full = json.loads((out / "report" / "reproduction.json").read_text())
    assert set(full["arms"]) == set(arms) and stages(out)["evaluate"]["covers"] == list(arms)
    ids = [
        json.loads(line)["id"] for line in (out / "report" / "relax-chgnet.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids)) and any(i.startswith("sft/") for i in ids)


def test_partial_with_no_finished_arm_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["reproduce", "--scale", "tiny", "--out", str(tmp_path / "r"), "--partial"])
    assert result.exit_code == 1 and "no finished arm" in result.output
    assert not (tmp_path / "r").exists()


def test_an_arm_from_another_takes_its_overrides_then_its_own(tmp_path):
    """`from` copies the named arm's overrides (chained), the arm's own win; a loop or an unknown arm is a
    one-line error."""
    from pipeline.config import PipelineError

    preset = tmp_path / "arms.toml"
    preset.write_text(
        f'extends = "{reproduce_preset("tiny")}"\n'
        + '\n[arms.a]\n"reward.name" = "ehull"\n"grpo.lr" = 0.5\n'
        + '[arms.b]\nfrom = "a"\n"grpo.lr" = 0.25\n'
        + '[arms.c]\nfrom = "b"\n"grpo.group_size" = 3\n'
    )
    _, arms = load_arms(preset, [])
    assert (arms["b"]["reward"].name, arms["b"]["grpo"].lr) == ("ehull", 0.25)
    assert (arms["c"]["reward"].name, arms["c"]["grpo"].lr, arms["c"]["grpo"].group_size) == (
        "ehull",
        0.25,
        3,
    )
    assert arms["a"]["grpo"].lr == 0.5
    preset.write_text(preset.read_text() + '[arms.d]\nfrom = "e"\n[arms.e]\nfrom = "d"\n')
    with pytest.raises(PipelineError, match="loops"):
        load_arms(preset, [])
    preset.write_text(preset.read_text().replace('from = "e"', 'from = "nope"'))
    with pytest.raises(PipelineError, match="'nope' is not an arm"):
        load_arms(preset, [])

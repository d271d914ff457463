"""`crystal-grpo demo --quick`: the whole pipeline end to end, killed mid-run and resumed, and its bad-input errors.

The pipeline test runs the real console script in a subprocess on the packaged demo subset (no data directory),
SIGKILLs it once SFT is finished, then runs it again with the same --out and checks that nothing finished was
redone and that the report holds numbers in range.
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
from pipeline.demo import DEMO_STAGES

runner = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).with_name("crystal-grpo")


def demo_command(out: Path) -> list[str]:
    return [str(CONSOLE_SCRIPT), "demo", "--quick", "--out", str(out)]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRYSTAL_GRPO_DATA"}
    return env


def stages(out: Path) -> dict:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="module")
def resumed_demo(tmp_path_factory) -> tuple[Path, dict, str]:
    """Run the quick demo, kill it after SFT, resume it; return (out, stages after the kill, resumed output)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    process = subprocess.Popen(
        demo_command(out), env=demo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 900
    while (
        not stages(out).get("sft", {}).get("done") and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    killed = stages(out)
    assert killed.get("sft", {}).get("done"), "the demo died or timed out before finishing SFT"
    resumed = subprocess.run(
        demo_command(out), env=demo_env(), capture_output=True, text=True, timeout=1800, check=False
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out, killed, resumed.stdout + resumed.stderr


def test_every_stage_completes_and_finished_stages_are_not_redone(resumed_demo):
    out, killed, output = resumed_demo
    final = stages(out)
    assert all(final[name]["done"] for name in DEMO_STAGES)
    for name, record in killed.items():
        assert final[name] == record, f"stage {name} was redone after the resume"
        assert f"stage {name}: done earlier" in output
    assert "Table 1" in output or "E_hull" in output


def test_run_directory_holds_config_logs_checkpoints_and_models(resumed_demo):
    out, _, _ = resumed_demo
    assert (out / "config.toml").is_file()
    for stage_dir in ("sft", "grpo"):
        assert (out / stage_dir / "final_model" / "model.safetensors").is_file()
        assert list((out / stage_dir / "checkpoints").glob("step-*"))
    sft_steps = [
        json.loads(line)["step"] for line in (out / "sft" / "sft_log.jsonl").read_text().splitlines()
    ]
    assert sft_steps == sorted(set(sft_steps)), "SFT log has repeated or unordered steps"
    grpo_log = [json.loads(line) for line in (out / "grpo" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in grpo_log] == list(range(1, len(grpo_log) + 1))
    for record in grpo_log:
        assert math.isfinite(record["reward_mean"]) and 0.0 <= record["valid_fraction"] <= 1.0


def test_report_files_hold_numbers_in_range(resumed_demo):
    out, _, _ = resumed_demo
    report = out / "report"
    for name in ("metrics.json", "table1.md", "table2.md"):
        assert (report / name).is_file(), name
    samples = [json.loads(line) for line in (out / "samples" / "sft.jsonl").read_text().splitlines()]
    assert samples and all({"formula", "text", "parse"} <= set(s) for s in samples)
    metrics = json.loads((report / "metrics.json").read_text())
    rates = []

    def collect(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, k)
        elif isinstance(node, float) and key.endswith("_rate"):
            rates.append((key, node))

    collect(metrics)
    assert rates, "metrics.json holds no rates"
    for key, value in rates:
        assert math.isnan(value) or 0.0 <= value <= 1.0, (key, value)


def test_out_that_is_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(target)])
    assert result.exit_code == 1
    assert "not a directory" in result.output and "Traceback" not in result.output


def test_missing_data_directory_is_a_one_line_error(tmp_path):
    result = runner.invoke(
        app, ["demo", "--quick", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none")]
    )
    assert result.exit_code == 1
    assert "error" in result.output and "Traceback" not in result.output


def test_empty_data_directory_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "run"), "--data-dir", str(empty)])
    assert result.exit_code == 1
    assert "error" in result.output and "Traceback" not in result.output


def test_unknown_reward_is_a_one_line_error(tmp_path):
    result = runner.invoke(
        app, ["demo", "--quick", "--out", str(tmp_path / "run"), "--reward", "no-such-reward"]
    )
    assert result.exit_code == 1
    assert "no-such-reward" in result.output and "Traceback" not in result.output


def test_run_directory_of_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text('[run]\nmodel = "small"\n')
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 1
    assert "different settings" in result.output and "run.model" in result.output

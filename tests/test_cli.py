"""The command line through typer's CliRunner: real commands on real files, exit codes and messages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from cli import app
from crystals.text import format_structure, write_cif

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "check", "sft", "train", "sample", "reward", "evaluate", "demo", "bench"):
        assert command in result.output


def test_bench_unknown_name_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["bench", "nope", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 1
    assert "unknown benchmark(s) ['nope']" in result.output and "grpo_step" in result.output


def test_data_info_on_packaged_demo(monkeypatch):
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    result = runner.invoke(app, ["data", "info"])
    assert result.exit_code == 0, result.output
    assert "demo_data" in result.output
    assert "train" in result.output and "test" in result.output


def test_data_info_on_shared_data(mp20_dir):
    result = runner.invoke(app, ["data", "info", "--data-dir", str(mp20_dir)])
    assert result.exit_code == 0, result.output
    assert "9046" in result.output  # test split rows
    assert "89 elements" in result.output


def test_data_info_missing_directory_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["data", "info", "--data-dir", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "error" in result.output
    assert "Traceback" not in result.output


def test_check_reads_text_and_cif(tmp_path, rocksalt):
    text_file = tmp_path / "nacl.txt"
    text_file.write_text(format_structure(rocksalt))
    cif_file = tmp_path / "nacl.cif"
    cif_file.write_text(write_cif(rocksalt))
    result = runner.invoke(app, ["check", str(text_file), str(cif_file)])
    assert result.exit_code == 0, result.output
    assert result.output.count("NaCl") == 2


def test_check_flags_overlapping_atoms_without_failing(tmp_path):
    overlapping = tmp_path / "overlap.txt"
    overlapping.write_text("4.0 4.0 4.0 90 90 90 Na 0.00 0.00 0.00 Cl 0.01 0.00 0.00")
    result = runner.invoke(app, ["check", str(overlapping)])
    assert result.exit_code == 0, result.output
    assert "overlap" in result.output


@pytest.mark.parametrize(
    "content",
    ["", "hello world", "4.0 4.0 4.0 90 90 90 Xx 0.0 0.0 0.0", "4.0 4.0 nan 90 90 90 Na 0 0 0"],
)
def test_check_malformed_input_exits_nonzero(tmp_path, content):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    result = runner.invoke(app, ["check", str(bad)])
    assert result.exit_code == 1
    assert "could not be read" in result.output


def test_check_missing_file_exits_nonzero(tmp_path):
    result = runner.invoke(app, ["check", str(tmp_path / "missing.cif")])
    assert result.exit_code == 1
    assert "unreadable" in result.output


def test_unknown_config_key_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["sft", "--out", str(tmp_path / "run"), "--set", "sft.learning_rate=1"])
    assert result.exit_code == 1
    assert "unknown option" in result.output


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["sft", "--out", str(target)])
    assert result.exit_code == 1
    assert "not a directory" in result.output


def test_reward_list_and_unknown_name():
    listed = runner.invoke(app, ["reward", "--list", "x"])
    assert listed.exit_code == 0, listed.output
    assert "chgnet-etot" in listed.output and "ehull" in listed.output
    unknown = runner.invoke(app, ["reward", "x.txt", "--reward", "no-such-reward"])
    assert unknown.exit_code == 1
    assert "no-such-reward" in unknown.output


def test_reward_scores_jsonl_with_penalties(tmp_path, rocksalt):
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"formula": "NaCl", "text": format_structure(rocksalt)},
        {"formula": "NaCl", "text": "not a crystal"},
        {"formula": "KBr", "text": format_structure(rocksalt)},  # wrong species for the prompt
    ]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["reward", str(samples), "--reward", "chgnet-etot+species"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "samples.jsonl#" in line]
    assert len(lines) == 3
    assert "-0.1000" in lines[1]
    assert "species" in lines[2]


def test_train_switches_to_ehull_with_one_option(tmp_path, monkeypatch):
    """A real (tiny) GRPO run from the CLI with `--reward ehull`: one step logged, E_hull recorded as the reward."""
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    out = tmp_path / "run"
    overrides = [
        "run.train_limit=40",
        "run.tokenizer_vocab_size=600",
        "grpo.total_steps=1",
        "grpo.prompts_per_step=1",
        "grpo.group_size=2",
        "grpo.max_new_tokens=8",
        "grpo.kl_coef=0",
    ]
    args = ["train", "--out", str(out), "--model", "tiny", "--reward", "ehull"]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert 'name = "ehull"' in (out / "config.toml").read_text()
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    # 8 new tokens of an untrained model never make a crystal: every sample gets E_hull's clipped penalty (-1)
    assert records[0]["reward_mean"] == pytest.approx(-1.0)
    assert (out / "final_model" / "model.safetensors").is_file()


def test_evaluate_writes_tables_and_metrics(tmp_path, monkeypatch):
    """`evaluate` on known crystals (packaged demo test structures, written as the model would write them)."""
    from crystals.data import iter_split

    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    records = [r for r in iter_split("test", None, limit=40) if len(r.structure) <= 6][:3]
    samples = tmp_path / "samples.jsonl"
    rows = [
        {"id": r.material_id, "formula": r.formula, "text": format_structure(r.structure)} for r in records
    ]
    rows.append({"id": "junk", "formula": "NaCl", "text": "not a crystal"})
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "report"
    args = [
        "evaluate",
        str(samples),
        "--out",
        str(out),
        "--train-limit",
        "10",
        "--workers",
        "0",
        "--max-steps",
        "30",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("metrics.json", "table1.md", "table2.md"):
        assert (out / name).is_file()
    assert "E_hull [eV/atom]" in result.output  # printed as text: rich markup would eat the brackets
    run = json.loads((out / "metrics.json").read_text())["runs"]["samples"]
    assert run["parse_rate"] == pytest.approx(3 / 4)
    assert run["table1"]["n_relaxed"] == 3
    assert 0.0 <= run["table1"]["metastable_rate"] <= 1.0
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "none.jsonl"), "--out", str(out)])
    assert missing.exit_code == 1 and "not found" in missing.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed (extra: vllm)")
def test_train_with_the_vllm_generator_syncs_weights_every_step(tmp_path, monkeypatch):
    """`train --generator vllm`: rollouts from an in-process vLLM engine built from the starting model, the
    updated weights loaded into it after each step (sync time and bytes in the step log). Run as its own
    process, as a user would: an engine must not outlive the test in the pytest process."""
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    out = tmp_path / "run"
    args = [
        sys.executable,
        str(REPO / "cli.py"),
        "train",
        "--out",
        str(out),
        "--model",
        "tiny",
        "--reward",
        "validity",
        "--generator",
        "vllm",
    ]
    for item in (
        "run.train_limit=40",
        "run.tokenizer_vocab_size=600",
        "grpo.total_steps=2",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
        "grpo.max_new_tokens=16",
        "grpo.lr=1e-3",
    ):
        args += ["--set", item]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync_bytes"] > 1e6 and r["sync_ms"] > 0 for r in records)
    assert '[generator]\nkind = "vllm"' in (out / "config.toml").read_text()
    bad = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--generator", "nope"])
    assert bad.exit_code == 1 and "unknown generator 'nope'" in bad.output


def test_shipped_paper_config_loads_with_the_papers_settings():
    from grpo.generation import GeneratorConfig
    from grpo.trainer import GRPOConfig
    from pipeline.config import RewardConfig, RunConfig, load_configs

    path = REPO / "configs" / "qwen2.5-7b-paper.toml"
    sections = {"run": RunConfig, "grpo": GRPOConfig, "reward": RewardConfig, "generator": GeneratorConfig}
    configs = load_configs(sections, path, [])
    run, grpo = configs["run"], configs["grpo"]
    assert run.model == "Qwen/Qwen2.5-7B-Instruct" and run.gradient_checkpointing
    # fp32 masters with bf16 compute: bf16 masters would lose nearly every update at lr 1e-6
    assert (run.dtype, run.compute_dtype) == ("float32", "bfloat16")
    assert (configs["generator"].kind, configs["generator"].dtype) == ("vllm", "bfloat16")
    assert (grpo.prompts_per_step, grpo.group_size, grpo.lr, grpo.kl_coef) == (1024, 5, 1e-6, 0.001)
    assert grpo.mini_batch_size == 256 * grpo.group_size and grpo.max_new_tokens == 1024
    assert configs["reward"].name == "chgnet-etot+species"

"""Bad invocations of every command (issue 20): each ends in one `error:` line and exit code 1, within seconds,
and leaves an existing run directory exactly as it was (files, contents and modification times).

The cases are what a new user tries: paths that are not models, nonsense numbers, files that are not configs or
samples. Each runs through typer's CliRunner in this process, so an uncaught exception shows up as
`result.exception` (the traceback a user would see) instead of the SystemExit of a clean error.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from cli import app
from crystals.text import format_structure, write_cif
from grpo.sft import SFTConfig
from grpo.trainer import GRPOConfig
from pipeline.config import load_configs, save_resolved_config
from pipeline.runs import SFT_SECTIONS, TRAIN_SECTIONS

runner = CliRunner()
CASE_SECONDS = 120  # a bad input fails fast; a case still running after this hangs (e.g. an empty pool)

ROCKSALT = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])
# A flat cell whose exact decimal angles close (60 + 60 > 119.99...), but whose float angles do not: the lattice
# pymatgen builds from them has volume 0.0.
FLAT_CELL = "100 100 100 60 60 119.999999999999995 Li 0 0 0"


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


FILES = {
    "model_file": "not a model",
    "binary.toml": bytes(range(256)),
    "value.toml": "sft = 3\n",
    "flat.txt": FLAT_CELL,
    "list.jsonl": jsonl("[1, 2]"),
    "int_formula.jsonl": jsonl({"formula": 123, "text": format_structure(ROCKSALT)}),
    "bad_formula.jsonl": jsonl({"formula": "Xx!!", "text": format_structure(ROCKSALT)}),
    "numeric_cif.jsonl": jsonl({"formula": "NaCl", "cif": 5}),
    "numeric_text.jsonl": jsonl({"formula": "NaCl", "text": 5}),
    "good.jsonl": jsonl({"id": "a", "formula": "NaCl", "text": format_structure(ROCKSALT)}),
}
# Given before a case's own options (a later --set wins), so a case that is wrongly accepted trains for seconds.
SMALL_SETTINGS = ["run.train_limit=40", "run.tokenizer_vocab_size=600"]
SMALL_STEPS = {
    "sft": ["sft.total_steps=2", "sft.batch_size=2", "sft.eval_samples=2"],
    "train": ["grpo.total_steps=1", "grpo.prompts_per_step=1", "grpo.group_size=2", "grpo.max_new_tokens=4"],
}

# (id, command line: {tmp} is a scratch folder holding FILES and an empty `emptydir/`, {out} a fresh --out,
# {sft_run} / {grpo_run} existing run directories), a fragment the error line must hold.
CASES = [
    # --- models that cannot be loaded
    ("sft-model-missing", "sft --out {out} --model {tmp}/nonexistent", "no such file or directory"),
    ("sft-model-file", "sft --out {out} --model {tmp}/model_file", "not a model directory"),
    ("sft-model-empty-dir", "sft --out {out} --model {tmp}/emptydir", "no config.json"),
    ("train-model-missing", "train --out {out} --model {tmp}/nonexistent", "no such file or directory"),
    ("train-model-file", "train --out {out} --model {tmp}/model_file", "not a model directory"),
    ("train-model-empty-dir", "train --out {out} --model {tmp}/emptydir", "no config.json"),
    ("sample-model-missing", "sample --model {tmp}/nonexistent --out {tmp}/s.jsonl", "no such file"),
    # --- SFT settings (validated as GRPO's are)
    ("sft-batch-size-0", "sft --out {out} --set sft.batch_size=0", "[sft] batch_size must be >= 1, got 0"),
    ("sft-eval-every-0", "sft --out {out} --set sft.eval_every=0", "eval_every must be >= 1"),
    (
        "sft-checkpoint-every-0",
        "sft --out {out} --set sft.checkpoint_every=0",
        "checkpoint_every must be >= 1",
    ),
    ("sft-log-every-0", "sft --out {out} --set sft.log_every=0", "log_every must be >= 1"),
    ("sft-lr-negative", "sft --out {out} --set sft.lr=-1", "lr must be > 0"),
    ("sft-total-steps-0", "sft --out {out} --set sft.total_steps=0", "total_steps must be >= 1"),
    ("sft-total-steps-negative", "sft --out {out} --set sft.total_steps=-3", "total_steps must be >= 1"),
    ("sft-max-length-0", "sft --out {out} --set sft.max_length=0", "max_length must be >= 1"),
    ("sft-keep-last-negative", "sft --out {out} --set sft.keep_last=-1", "keep_last must be >= 0"),
    ("sft-min-lr-ratio", "sft --out {out} --set sft.min_lr_ratio=2", "min_lr_ratio must be in [0, 1]"),
    ("sft-unknown-key", "sft --out {out} --set sft.nosuch=1", "[sft] unknown option(s) ['nosuch']"),
    ("sft-vocab-too-small", "sft --out {out} --set run.tokenizer_vocab_size=10", "tokenizer_vocab_size"),
    ("sft-train-limit-0", "sft --out {out} --set run.train_limit=0", "train_limit must be >= 1"),
    ("sft-binary-config", "sft --out {out} --config {tmp}/binary.toml", "is not valid TOML"),
    ("sft-config-table-a-value", "sft --out {out} --config {tmp}/value.toml", "sft must be a table"),
    ("sft-data-dir-empty", "sft --out {out} --model tiny --data-dir {tmp}/emptydir", "emptydir"),
    # --- GRPO settings
    ("train-temperature-0", "train --out {out} --set grpo.temperature=0", "temperature must be > 0"),
    ("train-top-p-0", "train --out {out} --set grpo.top_p=0", "top_p must be in (0, 1]"),
    ("train-group-size-1", "train --out {out} --set grpo.group_size=1", "group_size must be >= 2"),
    ("train-lr-0", "train --out {out} --set grpo.lr=0", "lr must be > 0"),
    ("train-failed-steps-0", "train --out {out} --set grpo.max_failed_reward_steps=0", ">= 1"),
    ("train-unknown-generator", "train --out {out} --generator nope", "unknown generator 'nope'"),
    # --- sampling
    ("sample-per-formula-0", "sample --model {tmp}/m --out {tmp}/s.jsonl --samples-per-formula 0", ">= 1"),
    (
        "sample-max-new-tokens-0",
        "sample --model {tmp}/m --out {tmp}/s.jsonl --set sample.max_new_tokens=0",
        ">= 1",
    ),
    ("sample-num-formulas-negative", "sample --model {tmp}/m --out {tmp}/s.jsonl --num-formulas -2", ">= 1"),
    ("sample-split-unknown", "sample --model {tmp}/m --out {tmp}/s.jsonl --split nosuch", "must be one of"),
    ("sample-out-is-a-dir", "sample --model {tmp}/m --out {tmp}/emptydir", "is a directory"),
    # --- samples files for `reward` and `evaluate` (one reader)
    ("reward-line-not-object", "reward {tmp}/list.jsonl --reward validity", "expected a JSON object"),
    ("reward-formula-int", "reward {tmp}/int_formula.jsonl --reward validity", "formula 123"),
    ("reward-formula-garbage", "reward {tmp}/bad_formula.jsonl --reward validity", "formula 'Xx!!'"),
    ("reward-text-int", "reward {tmp}/numeric_text.jsonl --reward validity", "text must be a string"),
    ("reward-missing-file", "reward {tmp}/none.jsonl --reward validity", "none.jsonl"),
    ("evaluate-formula-int", "evaluate {tmp}/int_formula.jsonl --out {out} --workers 0", "formula 123"),
    ("evaluate-cif-int", "evaluate {tmp}/numeric_cif.jsonl --out {out} --workers 0", "cif must be a string"),
    ("evaluate-line-not-object", "evaluate {tmp}/list.jsonl --out {out} --workers 0", "a JSON object"),
    # --- relaxation and evaluation settings
    (
        "evaluate-workers-negative",
        "evaluate {tmp}/good.jsonl --out {out} --train-limit 5 --workers -1",
        "workers must be >= 0",
    ),
    (
        "evaluate-max-steps-negative",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --max-steps -1",
        "max_steps must be >= 1",
    ),
    (
        "evaluate-max-steps-0",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --max-steps 0",
        "max_steps must be >= 1",
    ),
    (
        "evaluate-fmax-0",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --set relax.fmax=0",
        "fmax must be > 0",
    ),
    (
        "evaluate-timeout-0",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --set relax.timeout_s=0",
        "timeout_s",
    ),
    (
        "evaluate-train-limit-0",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 0",
        "train_limit must be",
    ),
    (
        "evaluate-relaxer-unknown",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --relaxer nope",
        "unknown relaxer",
    ),
    (
        "evaluate-relaxer-option",
        "evaluate {tmp}/good.jsonl --out {out} --workers 0 --train-limit 5 --relaxer-option x",
        "KEY=VALUE",
    ),
    # --- structures the parser must refuse
    ("check-flat-cell", "check {tmp}/flat.txt", "could not be read"),
    # --- existing runs: refused with the differing keys named, or failing before anything is written
    ("sft-existing-other-model", "sft --out {sft_run} --model {tmp}/nonexistent", "(run.model)"),
    ("sft-existing-other-data", "sft --out {sft_run} --data-dir {tmp}/emptydir", "(run.data_dir)"),
    (
        "sft-existing-no-resume-bad-model",
        "sft --out {sft_run} --no-resume --model {tmp}/nonexistent",
        "no such",
    ),
    (
        "sft-existing-no-resume-empty-data",
        "sft --out {sft_run} --no-resume --data-dir {tmp}/emptydir",
        "emptydir",
    ),
    ("sft-existing-bad-setting", "sft --out {sft_run} --set sft.batch_size=0", "batch_size must be >= 1"),
    ("train-existing-other-model", "train --out {grpo_run} --model {tmp}/nonexistent", "(run.model)"),
    (
        "train-existing-no-resume-bad-model",
        "train --out {grpo_run} --no-resume --model {tmp}/nonexistent",
        "no such",
    ),
    ("train-existing-other-reward", "train --out {grpo_run} --reward os:getcwd", "(reward.name)"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    for name, content in FILES.items():
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp / "emptydir").mkdir()
    (tmp / "m").mkdir()  # `sample` options are checked before its --model is read
    return tmp


def existing_run(path: Path, sections: dict, overrides: list[str], log: str) -> Path:
    """A run directory as a finished run leaves it: its resolved config, a log, a checkpoint, models."""
    save_resolved_config(path, load_configs(sections, None, overrides))
    (path / log).write_text(jsonl({"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}))
    for part in ("checkpoints/step-000002/model", "initial_model", "final_model"):
        (path / part).mkdir(parents=True)
        (path / part / "config.json").write_text("{}")
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root with its kind, modification time and content hash."""
    return {
        str(p.relative_to(root)): (
            p.is_dir(),
            p.stat().st_mtime_ns,
            None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
    }


class Hung(Exception):
    pass


def invoke(args: list[str]):
    """Run the command; a hang becomes an exception after CASE_SECONDS instead of a stuck suite."""

    def alarm(signum, frame):
        raise Hung(f"still running after {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_SECONDS)
    try:
        return runner.invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(result, fragment: str) -> None:
    assert isinstance(result.exception, SystemExit), (
        f"not a clean exit: {result.exception!r}\n{result.output}"
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize(("args", "fragment"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_clean_line_and_changes_nothing(args, fragment, scratch, tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    sft_run = existing_run(
        tmp_path / "sft_run", SFT_SECTIONS, SMALL_SETTINGS + SMALL_STEPS["sft"], "sft_log.jsonl"
    )
    grpo_run = existing_run(
        tmp_path / "grpo_run", TRAIN_SECTIONS, SMALL_SETTINGS + SMALL_STEPS["train"], "train_log.jsonl"
    )
    before = {run: snapshot(run) for run in (sft_run, grpo_run)}
    out = tmp_path / "out"
    words = args.format(tmp=scratch, out=out, sft_run=sft_run, grpo_run=grpo_run).split()
    if words[0] in SMALL_STEPS:
        small = [word for item in SMALL_SETTINGS + SMALL_STEPS[words[0]] for word in ("--set", item)]
        words = [words[0], "--model", "tiny", *small, *words[1:]]  # a case's own --model comes later and wins
    result = invoke(words)
    assert_one_line_error(result, fragment)
    assert not out.exists(), f"a failed run created {sorted(p.name for p in out.rglob('*'))}"
    for run, files in before.items():
        assert snapshot(run) == files, f"{run.name} was changed"


def test_reward_reads_cif_only_samples_as_evaluate_does(scratch):
    """A samples line holding only `cif` (as `evaluate` accepts) is scored on that structure, not as empty text."""
    path = scratch / "cif_only.jsonl"
    path.write_text(jsonl({"formula": "NaCl", "cif": write_cif(ROCKSALT)}, {"formula": "NaCl", "text": ""}))
    result = runner.invoke(app, ["reward", str(path), "--reward", "validity"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "cif_only.jsonl#" in line]
    assert len(rows) == 2
    assert "0.0000" in rows[0] and "parse_error" not in rows[0]
    assert "-0.1000" in rows[1] and "parse_error:empty" in rows[1]


def test_config_checks_name_the_table_and_keep_grpo_messages_plain():
    """The config classes themselves raise plain ValueErrors (the loader adds the table name)."""
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"^temperature must be > 0"):
        GRPOConfig(temperature=0.0)


def test_a_reward_that_fails_on_every_sample_ends_the_run_with_an_error(tmp_path, monkeypatch):
    """`--reward os:getcwd` (a function that cannot score a sample) used to train to the end on nothing but
    reward_error penalties and exit 0; it now stops after grpo.max_failed_reward_steps (3) such steps."""
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    out = tmp_path / "run"
    settings = [*SMALL_SETTINGS, *SMALL_STEPS["train"], "grpo.total_steps=5", "grpo.kl_coef=0"]
    args = ["train", "--out", str(out), "--model", "tiny", "--reward", "os:getcwd"]
    result = invoke(args + [word for item in settings for word in ("--set", item)])
    assert_one_line_error(result, "the reward failed on every sample of 3 steps in a row")
    assert "getcwd() takes no arguments" in result.stderr
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["penalty/reward_error:TypeError"] == 2 for r in records)
    assert not (out / "final_model").exists()  # no model that looks trained


def test_a_run_that_fails_after_building_its_first_model_leaves_nothing_to_trust(tmp_path, monkeypatch):
    """`sft.max_length` too short for any pair is found only with the tokenizer, so after RUN/initial_model was
    built. The settings were never recorded (no config.toml), so the next attempt, with another vocabulary,
    must build its own model instead of reusing that one."""
    from grpo.models import load_tokenizer

    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    out = tmp_path / "run"
    words = [
        "sft",
        "--out",
        str(out),
        "--model",
        "tiny",
        "--set",
        "sft.max_length=5",
        "--set",
        "run.train_limit=40",
    ]
    first = invoke([*words, "--set", "run.tokenizer_vocab_size=600"])
    assert_one_line_error(first, "training pairs are longer than max_length=5 tokens")
    assert sorted(p.name for p in out.iterdir()) == ["initial_model"]  # no config.toml, log or checkpoint
    second = invoke([*words, "--set", "run.tokenizer_vocab_size=700"])
    assert_one_line_error(second, "max_length=5")
    assert (
        650 < len(load_tokenizer(out / "initial_model")) <= 700 + 100
    )  # built again with the new vocabulary

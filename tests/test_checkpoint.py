"""grpo/checkpoint.py: atomic writes, pruning, state round trip; and a GRPO run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from grpo.atomic import atomic_directory, atomic_write_text
from grpo.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from grpo.run_log import read_log
from tests import resume_worker

REPO_ROOT = Path(__file__).resolve().parents[1]


class StubPretrained:
    """Stands in for a model or tokenizer: `save_pretrained` writes `{name}.txt` holding `payload`."""

    def __init__(self, name: str, payload: str = "", fail: bool = False):
        self.name, self.payload, self.fail = name, payload, fail

    def save_pretrained(self, path, **kwargs):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{self.name}.txt").write_text(self.payload)
        if self.fail:
            raise OSError("disk full")


def save(
    run_dir: Path, step: int, *, payload: str = "weights", keep_last: int = 2, fail: bool = False, **state
):
    return save_checkpoint(
        run_dir,
        step,
        model=StubPretrained("model", payload, fail),
        tokenizer=StubPretrained("tokenizer"),
        optimizer=None,
        scheduler=None,
        state=state,
        keep_last=keep_last,
    )


def payload(checkpoint: Path) -> str:
    return (checkpoint / "model" / "model.txt").read_text()


def entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ------------------------------------------------------------------------------ atomic layout


def test_checkpoint_layout_and_state(tmp_path):
    path = save(tmp_path, 3, sampler={"epoch": 1, "offset": 2})
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert {p.name for p in path.iterdir()} == {"model", "rng.pt", "state.json"}
    assert json.loads((path / "state.json").read_text()) == {"step": 3, "sampler": {"epoch": 1, "offset": 2}}
    assert entries(tmp_path) == ["step-000003"]  # no temporary directory left behind


def test_latest_checkpoint_ignores_partial_and_foreign_entries(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # no checkpoints/ directory yet
    save(tmp_path, 2, keep_last=0)
    save(tmp_path, 10, keep_last=0)
    root = tmp_path / "checkpoints"
    # a writer killed mid-checkpoint leaves its temporary directory, possibly complete-looking
    (root / ".tmp-step-000011-4242" / "model").mkdir(parents=True)
    (root / ".tmp-step-000011-4242" / "state.json").write_text('{"step": 11}')
    (root / "step-000012").write_text("a file, not a checkpoint")
    (root / "step-x").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-000010"  # numeric order, not text order
    assert list_checkpoints(tmp_path) == [root / "step-000002", root / "step-000010"]


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in range(1, 5):
        save(tmp_path, step, keep_last=2)
    assert entries(tmp_path) == ["step-000003", "step-000004"]
    for step in range(5, 8):
        save(tmp_path, step, keep_last=0)  # 0 keeps everything
    assert entries(tmp_path) == [f"step-00000{s}" for s in range(3, 8)]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    first = save(tmp_path, 2, payload="old")
    (first / "stray.txt").write_text("from the first write")
    second = save(tmp_path, 2, payload="new")
    assert second == first
    assert payload(second) == "new" and not (second / "stray.txt").exists()


def test_a_failed_write_leaves_the_previous_checkpoint_and_can_be_retried(tmp_path):
    good = save(tmp_path, 1, payload="good")
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, payload="half", fail=True)
    assert latest_checkpoint(tmp_path) == good and payload(good) == "good"
    retried = save(tmp_path, 2, payload="whole")  # same process: its leftover temporary directory is replaced
    assert latest_checkpoint(tmp_path) == retried and payload(retried) == "whole"
    assert entries(tmp_path) == ["step-000001", "step-000002"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    leftover = tmp_path / ".tmp-model-4242"  # a writer killed mid-save
    leftover.mkdir()
    (leftover / "config.json").write_text("")
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("one")
        assert not final.exists()  # nothing to trust until the block is done
    assert (final / "weights").read_text() == "one" and not leftover.exists()
    with pytest.raises(OSError, match="disk full"), atomic_directory(final) as tmp:
        (tmp / "weights").write_text("half")
        raise OSError("disk full")
    assert (final / "weights").read_text() == "one"  # a failed save leaves the old directory as it was
    with atomic_directory(final) as tmp:
        (tmp / "other").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["other"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_atomic_write_text_replaces_the_whole_file(tmp_path):
    path = tmp_path / "log.jsonl"
    atomic_write_text(path, "a\nb\n")
    atomic_write_text(path, "a\n")
    assert path.read_text() == "a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_optimizer_scheduler_and_rng_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    path = save_checkpoint(
        tmp_path,
        3,
        model=StubPretrained("model"),
        tokenizer=StubPretrained("tokenizer"),
        optimizer=optimizer,
        scheduler=scheduler,
        state={},
    )
    expected = (random.random(), np.random.rand(), torch.rand(2))  # the draws right after the save

    fresh_optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0 / (step + 1))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    loaded = load_checkpoint(path, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert loaded.step == 3 and loaded.path == path
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])
    assert fresh_scheduler.last_epoch == 3 and fresh_scheduler.get_last_lr() == pytest.approx([0.1 / 4])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh_optimizer.state_dict()["state"][0][key], value)


# ------------------------------------------------------------------------------ SIGKILL and resume


def start_worker(run_dir: Path, steps: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    """The worker process and the file that collects its output."""
    # one thread each: the two runs go side by side and a CPU count does not change the arithmetic
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    output = run_dir.parent / f"{run_dir.name}-{'-'.join(extra) or 'fresh'}.log"
    with open(output, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.resume_worker", str(run_dir), str(steps), *extra],
            cwd=REPO_ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    return process, output


def finish(worker: tuple[subprocess.Popen, Path], timeout: float = 300) -> None:
    process, output = worker
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.read_text()[-3000:]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "train_log.jsonl"
    return [r["step"] for r in read_log(path)] if path.exists() else []


@pytest.mark.slow
def test_grpo_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    run_b, run_b_output = start_worker(killed, 4, "--stall-at", "3")
    threads = torch.get_num_threads()
    try:
        # The uninterrupted run goes in this process meanwhile, with the workers' thread count (same arithmetic).
        torch.set_num_threads(1)
        resume_worker.run(straight, 4)
        # Wait until run B has checkpointed step 2 and logged step 3, then kill it without warning.
        deadline = time.monotonic() + 300
        while not ((killed / "checkpoints" / "step-000002").is_dir() and 3 in logged_steps(killed)):
            assert run_b.poll() is None, run_b_output.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.05)
    finally:
        torch.set_num_threads(threads)
        run_b.send_signal(signal.SIGKILL)  # also when the test failed: never leave the stalled worker behind
        run_b.wait(timeout=60)
    assert run_b.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed).name == "step-000002"
    assert logged_steps(killed) == [1, 2, 3]  # the log is ahead of the checkpoints

    finish(start_worker(killed, 4, "--resume"))

    assert logged_steps(straight) == [1, 2, 3, 4]
    assert logged_steps(killed) == [1, 2, 3, 4]  # step 3 ran again and is logged once
    assert [p.name for p in list_checkpoints(killed)] == ["step-000003", "step-000004"]
    a_log, b_log = read_log(straight / "train_log.jsonl"), read_log(killed / "train_log.jsonl")
    for a, b in zip(a_log, b_log, strict=True):  # same prompts, samples and rewards step by step
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-9)
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    assert a_log[-1]["kl"] > 0  # the reference model was in play

    weights_a = load_file(latest_checkpoint(straight) / "model" / "model.safetensors")
    weights_b = load_file(latest_checkpoint(killed) / "model" / "model.safetensors")
    step_3 = load_file(list_checkpoints(straight)[0] / "model" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, atol=1e-5, rtol=0)
    assert any(not torch.equal(step_3[k], weights_a[k]) for k in weights_a)  # the last step did train


TINY_SFT = ["--model", "tiny"] + [
    word
    for item in (
        "run.train_limit=40",
        "run.tokenizer_vocab_size=600",
        "sft.total_steps=2",
        "sft.batch_size=2",
        "sft.log_every=1",
    )
    for word in ("--set", item)
]


def test_sft_killed_while_saving_its_first_model_rebuilds_it_on_the_rerun(tmp_path, monkeypatch):
    """SIGKILL during the save of RUN/initial_model (weights written, tokenizer not yet): the rerun must not
    trust a half-written model folder but build it again and train to the end."""
    from typer.testing import CliRunner

    from cli import app
    from grpo.models import load_model_and_tokenizer

    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    run, sentinel = tmp_path / "run", tmp_path / "stalled"
    env = {k: v for k, v in os.environ.items() if k != "CRYSTAL_GRPO_DATA"} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.stalled_save", str(sentinel), "sft", "--out", str(run), *TINY_SFT]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not sentinel.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first model save never started"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    half = [p for p in run.iterdir() if p.name != "initial_model" and (p / "model.safetensors").is_file()]
    assert len(half) == 1 and not (half[0] / "tokenizer.json").exists()  # weights without a tokenizer
    assert not (run / "initial_model").exists()  # what a rerun would trust is not there
    assert not (run / "config.toml").exists()  # nothing of the run is recorded before its model is whole

    result = CliRunner().invoke(app, ["sft", "--out", str(run), *TINY_SFT])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # the leftover is gone
    load_model_and_tokenizer(run / "initial_model", dtype="float32")  # whole: it loads
    assert [r["step"] for r in read_log(run / "sft_log.jsonl")] == [1, 2]
    assert (run / "final_model" / "tokenizer.json").is_file()

    # Started over with other settings: nothing of the first run may stay to be resumed from later.
    built = (run / "initial_model" / "model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(
        app, ["sft", "--out", str(run), "--no-resume", *TINY_SFT, "--set", "sft.total_steps=1"]
    )
    assert again.exit_code == 0, again.output
    assert [r["step"] for r in read_log(run / "sft_log.jsonl")] == [1]
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]  # step-000002 of the first run is gone
    assert (run / "initial_model" / "model.safetensors").stat().st_mtime_ns != built  # built for this run

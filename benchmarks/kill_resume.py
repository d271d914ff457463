"""SIGKILL `sft`, `train` and `evaluate` again and again, and check that each run still ends as if it had never been
killed: the rerun resumes, nothing done is lost, the logs hold every step once.

Each command runs as a user runs it (`python cli.py ...`, its own process group, killed whole with SIGKILL) on the
packaged demo data with a tiny model. The kills land at chosen moments, watched on the file system: while the
first model (RUN/initial_model) is being saved, while a checkpoint is being written, while the final model is
being saved, and at random moments in between (for `evaluate`: while structures are being relaxed). After the
last kill the command is run to the end and compared with a straight run of the same command:

- it exits 0; the log has steps 1..N exactly once each (SFT, GRPO) or every sample id is relaxed once (evaluate);
- its numbers equal the straight run's (per-step loss and reward; per-structure energies): the largest
  difference is reported;
- the models it leaves load, and no temporary directory is left behind.

    python -m benchmarks.kill_resume [--kills 10] [--commands sft train evaluate] [--out DIR]

Not part of the test suite (it takes tens of minutes); tests/test_checkpoint.py and tests/test_evaluation.py hold
one kill each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["run.train_limit=40", "run.tokenizer_vocab_size=600"]
STEPS = 60  # long enough for every kill to land before the end (a tiny-model step takes ~0.1-1 s)
STUCK_S = 900  # a start that makes no progress for this long counts as a hang
COMMANDS: dict[str, list[str]] = {
    "sft": ["sft", "--model", "tiny"]
    + [
        f"--set={item}"
        for item in SMALL
        + [f"sft.total_steps={STEPS}", "sft.batch_size=2", "sft.eval_samples=4", "sft.eval_every=6"]
        + ["sft.checkpoint_every=3", "sft.log_every=1", "sft.keep_last=2", "sft.lr=1e-3"]
    ],
    "train": ["train", "--model", "tiny", "--reward", "validity"]
    + [
        f"--set={item}"
        for item in SMALL
        + [f"grpo.total_steps={STEPS}", "grpo.prompts_per_step=2", "grpo.group_size=2"]
        + ["grpo.max_new_tokens=12", "grpo.checkpoint_every=3", "grpo.lr=1e-3", "grpo.kl_coef=0.01"]
    ],
    "evaluate": ["evaluate", "{samples}", "--workers", "1", "--train-limit", "10", "--max-steps", "40"],
}
# Where the kills land, in turn (a moment that no longer comes, the first save once it is done, is skipped);
# the last kill lands in the final model save, since nothing follows it.
TRAINING_MOMENTS = ("first_model_save", "checkpoint_write", "random")
EVALUATE_MOMENTS = ("random",)
WATCHED = {
    "first_model_save": ".tmp-initial_model-*",
    "checkpoint_write": "checkpoints/.tmp-step-*",
    "final_model_save": ".tmp-final_model-*",
}


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CRYSTAL_GRPO_DATA"}  # the packaged demo data
    return env | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def command_line(name: str, out: Path, samples: Path) -> list[str]:
    args = [arg.format(samples=samples) for arg in COMMANDS[name]]
    return [sys.executable, str(REPO / "cli.py"), *args, "--out", str(out)]


def start(name: str, out: Path, samples: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as handle:
        return subprocess.Popen(
            command_line(name, out, samples),
            cwd=REPO,
            env=environment(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes relaxation workers with it
        )


LOGS = {"sft": "sft_log.jsonl", "train": "train_log.jsonl", "evaluate": "relax-chgnet.jsonl"}


def progress(name: str, out: Path) -> int:
    """Steps logged, or structures relaxed."""
    path = out / LOGS[name]
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def kill_at(name: str, out: Path, samples: Path, log: Path, moment: str, rng: random.Random) -> str:
    """Start the command and SIGKILL its process group at `moment`; "killed", or "finished" if it ended
    first."""
    done_before = progress(name, out)
    # temporaries of earlier kills stay until the next write clears them: wait for one of this process's
    seen = set(out.glob(WATCHED[moment])) if moment in WATCHED else set()
    process = start(name, out, samples, log)
    deadline = time.monotonic() + STUCK_S
    if moment == "random":  # once the run has gone past where the last one was killed, a random time later
        while process.poll() is None and progress(name, out) <= done_before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        while (
            process.poll() is None
            and not set(out.glob(WATCHED[moment])) - seen
            and time.monotonic() < deadline
        ):
            time.sleep(0.002)
    if process.poll() is not None:
        return "finished"
    if time.monotonic() >= deadline:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "stuck"  # made no progress for STUCK_S: a hang, reported as such
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return "killed"


def available(moment: str, out: Path) -> bool:
    """Whether `moment` can still come in this run directory."""
    if moment == "first_model_save":
        return not (out / "initial_model").is_dir()
    return True


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_training(name: str, killed: Path, straight: Path) -> dict:
    from grpo.models import load_model_and_tokenizer

    a, b = log_records(straight / LOGS[name]), log_records(killed / LOGS[name])
    steps = [r["step"] for r in b]
    keys = ["loss", "eval_loss"] if name == "sft" else ["loss", "reward_mean", "kl"]
    diffs = [
        abs(x[k] - y[k]) for x, y in zip(a, b, strict=False) for k in keys if x.get(k) is not None and k in y
    ]
    for model in ("initial_model", "final_model"):
        load_model_and_tokenizer(killed / model, dtype="float32")
    leftovers = sorted(str(p.relative_to(killed)) for p in killed.rglob(".tmp-*"))
    return {
        "steps_logged": len(steps),
        "steps_once_each_in_order": steps == list(range(1, STEPS + 1)),
        "same_steps_as_straight_run": steps == [r["step"] for r in a],
        "max_abs_difference_vs_straight": max(diffs) if diffs else None,
        "models_load": True,
        "leftover_temporaries": leftovers,
    }


def check_evaluate(killed: Path, straight: Path, ids: list[str]) -> dict:
    from evaluation.jsonl import read_jsonl

    a = {r["id"]: r for r in read_jsonl(straight / "relax-chgnet.jsonl")}
    records = read_jsonl(killed / "relax-chgnet.jsonl")
    b = {r["id"]: r for r in records}
    energy = "final_energy_per_atom"
    diffs = [abs(a[i][energy] - b[i][energy]) for i in a if a[i].get(energy) is not None and i in b]
    metrics_a = json.loads((straight / "metrics.json").read_text())["runs"]["samples"]["table1"]
    metrics_b = json.loads((killed / "metrics.json").read_text())["runs"]["samples"]["table1"]
    return {
        "records": len(records),
        "each_id_once": sorted(r["id"] for r in records) == sorted(ids),
        "max_abs_energy_difference_vs_straight": max(diffs) if diffs else None,
        "same_table1_as_straight_run": metrics_a == metrics_b,
    }


def samples_file(path: Path, n: int = 60) -> list[str]:
    """Known crystals of the packaged test split written as samples (as test_cli's evaluate test does)."""
    from crystals.data import iter_split
    from crystals.text import format_structure

    records = [r for r in iter_split("test", None, limit=1000) if len(r.structure) <= 8][:n]
    rows = [
        {"id": r.material_id, "formula": r.formula, "text": format_structure(r.structure)} for r in records
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [f"samples/{row['id']}" for row in rows]


def run_command(name: str, root: Path, kills: int, rng: random.Random) -> dict:
    samples = root / "samples.jsonl"
    ids = samples_file(samples) if name == "evaluate" else []
    straight, killed, log = root / f"{name}-straight", root / f"{name}-killed", root / f"{name}.log"
    began = time.monotonic()
    assert start(name, straight, samples, log).wait() == 0, log.read_text()[-3000:]
    moments = itertools.cycle(TRAINING_MOMENTS if name != "evaluate" else EVALUATE_MOMENTS)
    landed: list[dict] = []
    while sum(k["outcome"] == "killed" for k in landed) < kills and len(landed) < 2 * kills:
        last = sum(k["outcome"] == "killed" for k in landed) == kills - 1 and name != "evaluate"
        moment = "final_model_save" if last else next(moments)
        if not available(moment, killed):
            continue
        outcome = kill_at(name, killed, samples, log, moment, rng)
        landed.append({"moment": moment, "outcome": outcome, "progress_after": progress(name, killed)})
        if outcome != "killed" and not last:
            break  # the run got to its end (or hung) before the kill: more kills could not land mid-run
    final = start(name, killed, samples, log).wait()
    result = {
        "kills": sum(k["outcome"] == "killed" for k in landed),
        "kill_moments": landed,
        "final_exit_code": final,
        "seconds": round(time.monotonic() - began, 1),
    }
    if final == 0:
        result |= (
            check_evaluate(killed, straight, ids)
            if name == "evaluate"
            else check_training(name, killed, straight)
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    results = {name: run_command(name, root, args.kills, rng) for name in args.commands}
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"work directory: {root}")


if __name__ == "__main__":
    main()

"""Atomic checkpoints: model (safetensors), optimizer, scheduler, RNG states and trainer state.

A checkpoint is written into a hidden temporary directory and renamed into place, so a run killed mid-write leaves
either the previous checkpoint or the new one, never half of one. Only the newest `keep_last` are kept.

An FSDP-sharded run (grpo.distributed) writes the same files: every rank takes part in gathering the full model and
optimizer state to rank 0, which alone writes. So a sharded run's checkpoint loads in a single process and back.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpo.atomic import atomic_directory
from grpo.distributed import (
    full_model_state,
    is_main,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
)
from grpo.models import write_model

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step-{step}` atomically and prune older ones. `state` must be JSON-serialisable.
    Sharded model: collective (every rank calls it, rank 0 writes); every rank gets the path back."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    sharded = is_sharded(model)
    model_state = full_model_state(model) if sharded else None
    optim_state = optimizer_state(model, optimizer) if optimizer is not None else None
    if not is_main():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Leftovers of writers killed mid-save of any step hold up to a full checkpoint each: clear them first.
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_directory(final) as tmp:  # re-saving a step (e.g. after a resume) replaces it whole
        write_model(model, tokenizer, tmp / "model", model_state)
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, *, optimizer=None, scheduler=None, restore_rng: bool = True, model=None
) -> LoadedCheckpoint:
    """Restore optimizer, scheduler and RNG state in place; the model is loaded by the caller from `path / "model"`.
    An optimizer of a sharded model needs that `model` (collective: rank 0 reads the file and broadcasts)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None and (path / "optimizer.pt").exists():
        if model is not None and is_sharded(model):
            full = torch.load(path / "optimizer.pt", weights_only=False) if is_main() else {}
            load_optimizer_state(model, optimizer, full)
        else:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    if scheduler is not None and (path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return LoadedCheckpoint(path=path, step=int(state["step"]), state=state)

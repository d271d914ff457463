"""Step logs: one JSON object per line on disk, one compact line on the console, optional TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from grpo.atomic import atomic_write_text


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


# Console names of the logged metrics: a step line stays within 80 columns.
CONSOLE_LABELS = {
    "reward_mean": "reward",
    "valid_fraction": "valid",
    "grad_norm": "grad",
    "time_step": "seconds",
    "eval_loss": "eval",
}


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class RunLogger:
    """Appends metrics to `path` (JSONL), so a resumed run continues the same file."""

    def __init__(self, path: Path, *, console: Console | None = None, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.console = console or Console(stderr=True)
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: after a resume those steps are run again and must not appear twice."""
        if self.path.exists():
            kept = [r for r in read_log(self.path) if r.get("step", 0) <= step]
            # atomically: a kill while the log is rewritten must not take the kept records with it
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, metrics: dict[str, Any], console_keys: tuple[str, ...] = ()) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        if console_keys:
            parts = [f"{CONSOLE_LABELS.get(k, k)} {_short(record.get(k))}" for k in console_keys]
            self.console.print(f"[bold]step {step}[/bold]  " + "  ".join(parts))


def step_progress(label: str, *, disable: bool = False):
    """A rich progress bar over training steps with an ETA: use `bar.update(task, completed=step)`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, disable=disable, transient=True)


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL log; a torn last line (a killed writer) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

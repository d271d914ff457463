"""JSON Lines files that survive a killed writer.

A process killed mid-``write`` leaves at most one torn record: the file's last line, without its newline.
``read_jsonl`` skips such a tail (and only a tail: a bad line in the middle is a real error), and
``JsonlAppender`` cuts it off before appending, so the next record starts on a line of its own instead of
being glued onto the fragment. Every record is flushed as soon as it is written: a killed run loses at most
the record being written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN) and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file (blank lines ignored). A last line without a newline that is not valid
    JSON is a torn write and is skipped; any other bad line raises ``ValueError`` naming the line."""
    text = Path(path).read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn tail of a killed writer
            raise ValueError(f"{path}:{number}: not a JSON object ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


class JsonlAppender:
    """Appends one JSON record per line, flushed immediately; a torn last line is cut off on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self._handle = open(self.path, "a")

    def _drop_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)  # rfind is -1 when the torn line is the only one

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(jsonable(record)) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

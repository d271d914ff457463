"""Writes that a kill cannot leave half done: a file or a directory appears whole, or not at all.

Everything is written under a hidden temporary name next to its destination, flushed to disk (fsync), then
renamed into place; a rename within one filesystem is atomic. So a reader that finds the destination may trust
it, and a kill mid-write leaves only a temporary entry, which the next write of the same destination removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    # a directory is opened read-only to fsync its entries (the rename); files for their contents
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """The hidden sibling that `final` is written under by this process."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}")


def remove_leftovers(final: Path) -> None:
    """Temporary entries of earlier writers of `final` that were killed mid-write."""
    for leftover in final.parent.glob(f".tmp-{final.name}-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; when the block ends without an exception it becomes `final`
    (replacing an older `final` whole). On an exception `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if final.exists():
            # Moved aside, not deleted first: `final` is then missing only between two renames (never partial),
            # and the old directory waits under a temporary name that the next write clears.
            old = final.with_name(f".tmp-{final.name}-old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        if tmp.exists():  # the block failed: nothing of it may look like a result
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old contents or the new ones, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = temp_name(path)
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)

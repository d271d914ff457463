"""Shared fixtures: the MP-20 data directory beside the repo (../shared/data), skipped when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRYSTAL_GRPO_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The full data directory (holds mp20/ and hull/); skip the test when it is not there."""
    if not (SHARED_DATA / "mp20" / "test.csv.gz").exists():
        pytest.skip(f"MP-20 data not found at {SHARED_DATA} (set CRYSTAL_GRPO_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mp20_dir(shared_data_dir: Path) -> Path:
    return shared_data_dir / "mp20"

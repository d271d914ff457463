"""The import direction between the packages, read from the source with ``ast`` (nothing is imported).

crystals/ is the domain (structures, text, data, hull, potentials) and imports nothing else of ours;
rewards/ and evaluation/ build on crystals/, and evaluation/ never imports rewards/; grpo/ is the trainer
and imports none of the crystal packages. Imports inside functions count as well.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"crystals", "rewards", "evaluation", "grpo", "cli", "pipeline", "benchmarks", "tests"}

# package -> the packages of ours it may import (itself included)
ALLOWED = {
    "crystals": {"crystals"},
    "rewards": {"rewards", "crystals"},
    "evaluation": {"evaluation", "crystals"},
    "grpo": {"grpo"},
}


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a source file."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
            else:  # relative: resolved against the importing module's package
                base = package.split(".")[: -node.level]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])


def forbidden_imports(package: str) -> list[str]:
    """One "file:line imports module" per import of a package of ours that ``package`` may not use."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    assert forbidden_imports(package) == [], f"{package}/ may only import {sorted(ALLOWED[package])} of ours"


def test_the_walker_sees_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    pkg = tmp_path / "crystals"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "from .text import x\n\ndef f():\n    from rewards.base import Reward\n    import grpo.trainer\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert forbidden_imports("crystals") == [
        "crystals/bad.py:4 imports rewards.base",
        "crystals/bad.py:5 imports grpo.trainer",
    ]

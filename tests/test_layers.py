"""The architecture as import contracts: `lint-imports` checks those of pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.paths import PROJECT_ROOT


def lint_imports() -> str:
    """The `lint-imports` executable next to this interpreter (else on PATH)."""
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert found, "lint-imports is not installed: pip install -e '.[dev]'"
    return found


@pytest.mark.unit
def test_the_import_contracts_of_pyproject_hold() -> None:
    """orchestrator/ above serving/ above tracking/ above jobs/ (a package never imports one above it), and only
    tracking/ imports mlflow. `--no-cache`: the check writes nothing into the project."""
    done = subprocess.run(
        [lint_imports(), "--no-cache", "--no-logo"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout

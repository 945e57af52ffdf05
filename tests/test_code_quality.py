"""The project's static checks, run by the test suite (and so by CI's README test command): lint, format,
import layers, types, byte-compilation of every Python file and the library's function sizes.

Each runs the pinned tool of .venv (requirements.txt) on the checkout, as `scripts/static_checks.sh` and the
pre-commit hooks do; a failure prints the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

BIN = Path(sys.executable).parent
PYTHON_FOLDERS = ["lowdose", "apps", "tests", "benchmarks", "scripts", "slicer_extension"]


def _run(command: list[str], timeout: float = 600) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("check", ["lint", "format"])
def test_ruff(check):
    _run([str(BIN / "ruff"), *(["check"] if check == "lint" else ["format", "--check"]), *PYTHON_FOLDERS])


def test_import_layers():
    """docs/architecture.md's layers: a lower layer never imports a higher one (pyproject [tool.importlinter])."""
    _run([str(BIN / "lint-imports")])


def test_mypy_on_the_library():
    _run([str(BIN / "mypy")], timeout=900)


def test_every_python_file_compiles():
    """Benchmarks and scripts are not imported by any test: byte-compile them all on the project's Python."""
    _run([sys.executable, "-m", "compileall", "-q", *PYTHON_FOLDERS])


def test_no_library_function_is_longer_than_80_lines():
    _run([sys.executable, "scripts/check_function_sizes.py", "lowdose"])

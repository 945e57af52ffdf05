#!/usr/bin/env bash
# The static checks that tests/test_code_quality.py runs in CI (and pre-commit, file by file): lint, format, import layers, types, byte-compile,
# function sizes. Run from anywhere: scripts/static_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY_FILES=(lowdose apps tests benchmarks scripts slicer_extension)
.venv/bin/ruff check "${PY_FILES[@]}"
.venv/bin/ruff format --check "${PY_FILES[@]}"
.venv/bin/lint-imports
.venv/bin/mypy
# Every Python file compiles on the project's Python (benchmarks and the Slicer module are not imported by tests).
.venv/bin/python -m compileall -q "${PY_FILES[@]}" >/dev/null
.venv/bin/python scripts/check_function_sizes.py lowdose
echo "static checks: all passed"

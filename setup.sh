#!/usr/bin/env bash
# One setup step for lowdose: creates .venv and installs every pinned dependency (requirements.txt)
# plus lowdose itself. Safe to run again: it does nothing when .venv already matches requirements.txt.
# ./setup.sh --tests also installs the test suite's outside services (Orthanc with DICOMweb, apt).
set -euo pipefail
cd "$(dirname "$0")"

# --tests: also install what the test suite needs outside Python (Orthanc + DICOMweb, via apt).
if [ "${1:-}" = "--tests" ]; then
    scripts/install_orthanc.sh
elif [ -n "${1:-}" ]; then
    echo "usage: ./setup.sh [--tests]" >&2
    exit 2
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "setup.sh: lowdose needs Python 3.10-3.12 (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY

stamp=.venv/.lowdose-requirements.sha256
want=$(cat requirements.txt pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/lowdose ]; then
    exit 0
fi

echo "setup.sh: creating .venv and installing the pinned dependencies (first run takes a few minutes)" >&2
"$PYTHON" -m venv .venv
# Every package is pinned in requirements.txt, dependencies included, so pip installs exactly that set
# (--no-deps): no resolver surprises, no CUDA download beyond the pinned torch build.
.venv/bin/python -m pip install -qq --no-deps -r requirements.txt
.venv/bin/python -m pip install -qq --no-deps --no-build-isolation -e .
# A smoke test of the set: every package the project uses imports (torchvision beside torch, JPEG 2000).
.venv/bin/python -c "import lowdose, torch, torchvision, monai, monailabel, totalsegmentator, nnunetv2, SimpleITK, pydicom, pylibjpeg, openjpeg, skimage, bm3d, tqdm, yaml, ray, pyarrow"
echo "$want" > "$stamp"
echo "setup.sh: ready (.venv)" >&2

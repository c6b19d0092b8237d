#!/usr/bin/env bash
# Set up, then lint, type-check and run the whole test suite (end-to-end Flower runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
# Two workers: the end-to-end tests wait on processes more than they compute (13 min alone,
# under 9 in two workers on the 2-core machine). FEDAIOT_TEST_WORKERS=0 runs in one process.
.venv/bin/python -m pytest -q -n "${FEDAIOT_TEST_WORKERS:-2}" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: the suite is broken or filtered to nothing" >&2
    exit 1
fi
exit "$status"

#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, lint, then pytest (CPU; GPU tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=${PYTHON:-python3}
echo "[tests] ruff"
$PY -m ruff check megatron_lite tools tests benchmarks examples setup.py
echo "[tests] pytest"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY -m pytest -q --durations=15 tests "$@"

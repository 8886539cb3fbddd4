#!/usr/bin/env bash
# The GPU-hour check: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]
# (see benchmarks/gpu_check.py for the steps; writes OUT_DIR/summary.json and OUT_DIR/logs/).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"

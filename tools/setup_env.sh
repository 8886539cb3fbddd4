#!/usr/bin/env bash
# Install everything megatron_lite needs on a fresh machine, then build megatron_lite._C.
# torch is installed only if missing (users with their own CUDA build keep it); the extension
# is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch"
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q torch
fi
$PY -m pip install -q setuptools wheel ninja pybind11
echo "[setup] building megatron_lite (C++ extension; CUDA kernels too when torch has CUDA)"
MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -q --no-build-isolation -e ".[test]"
$PY -c "import megatron_lite._C as C; print('[setup] megatron_lite._C built, with_cuda =', C.with_cuda)"

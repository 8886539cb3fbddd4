#!/usr/bin/env bash
# Install everything megatron_lite needs on a fresh machine, then build megatron_lite._C.
# torch is installed only if missing (users with their own CUDA build keep it); the extension
# is built against the installed torch, hence --no-build-isolation. A rerun skips the build when
# the stamp of the last build (hash of csrc/, setup.py, torch version, arch lists) still matches.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  echo "[setup] installing torch"
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q torch
fi
STAMP_FILE=megatron_lite/.build_stamp
want=$($PY csrc/build_config.py stamp)
HERE=$PWD
# Up to date: the stamp matches, the installed package is this checkout (not another clone's
# editable install) and its _C imports.
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$want" ] \
    && (cd / && $PY -c "import os, sys, megatron_lite as M
sys.exit(os.path.realpath(os.path.dirname(M.__file__)) != os.path.realpath(sys.argv[1]))" "$HERE/megatron_lite") 2>/dev/null \
    && $PY -c "import importlib.metadata as m; m.distribution('megatron_lite'); import megatron_lite._C as C
print('[setup] megatron_lite._C is up to date (csrc/, setup.py and torch unchanged): not rebuilding;',
      'with_cuda =', C.with_cuda)" 2>/dev/null; then
  :
else
  $PY -m pip install -q setuptools wheel ninja pybind11
  echo "[setup] building megatron_lite (C++ extension; GPU kernels too when torch has CUDA/ROCm);"
  echo "[setup] compiler progress below, full log in build/setup_env.log"
  mkdir -p build
  rm -f "$STAMP_FILE"
  # -v shows ninja's "[i/n]" progress lines; everything else goes to the log only.
  MAX_JOBS=${MAX_JOBS:-2} $PY -m pip install -v --no-build-isolation -e ".[test]" \
    > build/setup_env.log 2>&1 < /dev/null &
  pid=$!
  shown=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    total=$(wc -l < build/setup_env.log)
    if [ "$total" -gt "$shown" ]; then
      sed -n "$((shown + 1)),${total}p" build/setup_env.log \
        | grep -E '^\[[0-9]+/[0-9]+\]|\[megatron_lite build\]' | cut -c1-120 || true
      shown=$total
    fi
  done
  if ! wait "$pid"; then
    grep -E '\[megatron_lite build\]' build/setup_env.log || tail -n 30 build/setup_env.log
    echo "[setup] build failed; full log: build/setup_env.log" >&2
    exit 1
  fi
  grep -E '\[megatron_lite build\]' build/setup_env.log | sort -u || true
  $PY -c "import megatron_lite._C as C; print('[setup] megatron_lite._C built, with_cuda =', C.with_cuda)"
  echo "$want" > "$STAMP_FILE"
fi

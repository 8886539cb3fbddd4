"""grouped_mm's faces (torch's grouped GEMM, the allocation-free loop, Triton) against the reference."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite import ops
from megatron_lite.ops import reference

ROOT = Path(__file__).resolve().parents[1]
gmm = importlib.import_module("megatron_lite.ops.grouped_mm")  # the module (ops.grouped_mm is the function)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton; in the [test] extra on Linux x86_64)"
)
RAGGED = [[5, 0, 37, 1], [0, 0, 16, 0], [40]]


def inputs(counts, d_in, d_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), d_in, generator=g).to(dtype)
    w = (torch.randn(len(counts), d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    gy = torch.randn(sum(counts), d_out, generator=g).to(dtype)
    return x, w, torch.tensor(counts), gy


def fwd_bwd(fn, x, w, counts, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, counts)
    y.backward(gy)
    return y, x.grad, w.grad


def assert_matches_reference(face_fn, counts, dtype, d_in=24, d_out=40, tol=None):
    x, w, tpe, gy = inputs(counts, d_in, d_out, dtype, seed=len(counts))
    got = fwd_bwd(face_fn, x, w, tpe, gy)
    want = fwd_bwd(reference.grouped_mm, x.double(), w.double(), tpe, gy.double())
    for g, r in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, **(tol or {"atol": 1e-5, "rtol": 1e-5}))
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.all(got[2][e] == 0), f"expert {e} has no rows, its weight grad must be zero"


@pytest.mark.parametrize("counts", RAGGED)
@pytest.mark.parametrize("face", ["torch", "loop"])
def test_cpu_faces_match_reference_fp32(face, counts):
    assert_matches_reference(lambda *a: gmm.run_face(face, *a), counts, torch.float32, d_in=32, d_out=48)


def test_auto_uses_torch_grouped_gemm_on_cpu_fp32_and_loop_for_odd_rows():
    x, w, _, _ = inputs([2, 2], 32, 48, torch.float32)
    assert gmm.grouped_mm_face(x, w) == ("torch", "")
    x, w, _, _ = inputs([2, 2], 6, 48, torch.float32)  # 24-byte rows
    face, reason = gmm.grouped_mm_face(x, w)
    assert face == "loop" and "16-byte aligned rows" in reason


def test_loop_face_backward_is_one_node_without_per_expert_slices():
    """The old loop sliced ``w[e]``; each slice's backward built a full [E, out, in] zero gradient."""
    x, w, tpe, gy = inputs([3, 0, 5], 8, 8, torch.float32)
    x.requires_grad_(), w.requires_grad_()
    y = gmm.run_face("loop", x, w, tpe)
    assert type(y.grad_fn).__name__ == "_LoopGroupedMMBackward"
    leaves = {type(fn).__name__ for fn, _ in y.grad_fn.next_functions if fn is not None}
    assert leaves == {"AccumulateGrad"}
    y.backward(gy)
    assert torch.all(w.grad[1] == 0)


def test_probe_answers_the_same_inside_no_grad_and_checkpoints(monkeypatch):
    """An evaluation run (no_grad) making the first call must not turn torch's GEMM off for good."""
    gmm._torch_cpu_probe.cache_clear()
    x, w, _, _ = inputs([2, 2], 32, 48, torch.float32)
    with torch.no_grad(), torch.inference_mode():
        assert gmm.grouped_mm_face(x, w) == ("torch", "")
    assert gmm.grouped_mm_face(x, w) == ("torch", "")


@pytest.mark.parametrize("face", ["torch", "loop"])
def test_faces_under_selective_recompute_match_reference(face):
    from megatron_lite.training.model_setup import _selectively_checkpointed

    x, w, tpe, gy = inputs([5, 0, 7, 4], 16, 24, torch.float32)
    fn = lambda a, b, c: _selectively_checkpointed(  # noqa: E731
        lambda a, b: gmm.run_face(face, a.sin(), b, c).cos(), a, b
    )
    got = fwd_bwd(fn, x, w, tpe, gy)
    want = fwd_bwd(lambda a, b, c: reference.grouped_mm(a.sin(), b, c).cos(), x, w, tpe, gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


# Triton reads TRITON_INTERPRET when it and the kernels are first imported, and other tests (or
# torch itself) may import triton earlier in this process; so the interpreted tests run in a fresh
# process started by the test below, with the variable set from the start.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter_process = pytest.mark.skipif(not INTERPRETED, reason="runs in a TRITON_INTERPRET=1 subprocess")


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter process")
def test_triton_face_under_the_interpreter_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"\b3 passed", proc.stdout), proc.stdout[-1000:]


@pytest.fixture
def interpreted_triton():
    """The Triton face, its kernels decorated for the CPU interpreter (TRITON_INTERPRET=1)."""
    return importlib.import_module("megatron_lite.ops.triton_grouped_mm")


@needs_triton
@in_interpreter_process
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, {"atol": 1e-5, "rtol": 1e-5}), (torch.float16, {"atol": 2e-2, "rtol": 1e-2})],
)
def test_triton_face_interpreted_matches_reference(interpreted_triton, dtype, tol):
    """fp32 and fp16 (the interpreter has no bf16); ragged groups, idle experts, spare tiles."""
    for counts in RAGGED:
        # 16-wide tiles: 37 rows span three tiles of one expert, 40 columns leave a partial tile.
        face = lambda x, w, c: interpreted_triton.grouped_mm(x, w, c, blocks=(16, 16, 16))  # noqa: E731
        assert_matches_reference(face, counts, dtype, tol=tol)


@needs_triton
@in_interpreter_process
def test_triton_tile_map_covers_every_row_once_interpreted(interpreted_triton):
    counts = torch.tensor([5, 0, 37, 1, 16])
    expert, row, ends = interpreted_triton.tile_map(counts, int(counts.sum()), 16)
    covered = torch.zeros(int(counts.sum()), dtype=torch.int64)
    for e, r in zip(expert.tolist(), row.tolist()):
        if e >= 0:
            stop = min(r + 16, int(ends[e]))
            covered[r:stop] += 1
            assert int(ends[e]) - int(counts[e]) <= r < int(ends[e])
    assert torch.all(covered == 1)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_triton_face_matches_reference(dtype):
    x, w, tpe, gy = inputs([300, 0, 17, 700], 256, 512, dtype, seed=5)
    from megatron_lite.ops import triton_grouped_mm

    got = fwd_bwd(triton_grouped_mm.grouped_mm, x.cuda(), w.cuda(), tpe.cuda(), gy.cuda())
    want = fwd_bwd(reference.grouped_mm, x.double(), w.double(), tpe, gy.double())
    tol = {"atol": 5e-2, "rtol": 2e-2} if dtype != torch.float32 else {"atol": 1e-3, "rtol": 1e-3}
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), r, **tol)
    with ops.use_backend("compiled"):  # some fast face must serve every GPU
        assert ops.grouped_mm(x.cuda(), w.cuda(), tpe.cuda()).shape == (x.shape[0], 512)

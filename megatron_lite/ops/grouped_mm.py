"""Public wrapper of the per-expert grouped matmul, with three fast faces and a reference.

Faces, chosen per call by :func:`grouped_mm_face`:

* ``torch``: torch's grouped GEMM (``F.grouped_mm`` or ``torch._grouped_mm``). Used on CPU for
  every dtype the installed torch accepts (probed once per dtype, then cached) and on CUDA where it
  is the fast CUTLASS kernel (bf16, sm90+, not ROCm). Elsewhere on CUDA torch's own fallback is a
  per-expert loop with a host sync, so it is not chosen there.
* ``triton``: :mod:`megatron_lite.ops.triton_grouped_mm`, for CUDA/ROCm GPUs without the fast
  path (A100, MI250X) when Triton imports.
* ``loop``: one ``mm`` per expert written into preallocated outputs, with a backward that writes
  each expert's weight gradient into one ``[E, out, in]`` tensor (no per-expert ``w[e]`` slice
  whose backward would materialise a full-size zero gradient). Needs the counts on the host.

The reference (:func:`megatron_lite.ops.reference.grouped_mm`) is the autograd-differentiated loop
over ``torch.split`` chunks that every face is tested against.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from megatron_lite.ops import _backend, reference
from megatron_lite.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, describe

_INT_DTYPES = (torch.int32, torch.int64)
FACES = ("torch", "triton", "loop")


def _torch_grouped_mm_fn():
    """torch's public ``F.grouped_mm`` (torch >= 2.10) or the private ``torch._grouped_mm``."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def _torch_cpu_probe(dtype: torch.dtype) -> str | None:
    """Runs a tiny forward + backward of torch's grouped GEMM on CPU once per dtype.

    Returns:
        None when it works, else why not (old torch without a CPU kernel, unsupported dtype).
    """
    fn = _torch_grouped_mm_fn()
    if fn is None:
        return f"torch {torch.__version__} has no grouped GEMM"
    # The first call may come from inside no_grad/inference_mode (evaluation) or a selective
    # checkpoint's dispatch mode (which would record the probe's ops as the block's own): step
    # out of all of them, so the answer depends on torch alone.
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad():
        return _run_cpu_probe(fn, dtype)


def _run_cpu_probe(fn, dtype: torch.dtype) -> str | None:
    try:
        x = torch.ones(6, 8, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
        y = fn(x, w.transpose(-2, -1), offs=torch.tensor([2, 6], dtype=torch.int32))
        y.backward(torch.ones_like(y))
        ok = bool(y[0, 0] == 8) and bool(w.grad[1, 0, 0] == 4)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"torch's grouped GEMM does not run on CPU in {dtype} ({str(exc).splitlines()[0]})"
    return None if ok else f"torch's grouped GEMM gave wrong results on CPU in {dtype}"


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (the Triton face is imported only when it is chosen)."""
    return importlib.util.find_spec("triton") is not None


def _torch_face_reason(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why torch's grouped GEMM should not run for these operands, or None when it should."""
    fn = _torch_grouped_mm_fn()
    if fn is None:
        return f"torch {torch.__version__} has no grouped GEMM"
    size = x.element_size()
    if (x.shape[1] * size) % 16 or (w.shape[1] * size) % 16:  # its operands need 16-byte row strides
        return (
            f"torch's grouped GEMM needs 16-byte aligned rows, got in={x.shape[1]} out={w.shape[1]} "
            f"in {x.dtype}"
        )
    if x.device.type == "cpu":
        return _torch_cpu_probe(x.dtype)
    if x.device.type != "cuda":
        return f"no grouped GEMM face for device type {x.device.type!r}"
    if torch.version.hip is not None:
        return "torch's grouped GEMM has no fast kernel on ROCm"
    if x.dtype != torch.bfloat16:
        return f"torch's fast grouped GEMM needs bf16 on CUDA, got {x.dtype}"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 9:
        return f"torch's fast grouped GEMM needs sm90+, got sm{major}{minor}"
    return None


def grouped_mm_unusable_reason(x: torch.Tensor, w: torch.Tensor, *, require_fast: bool = True) -> str | None:
    """Why no fast face (torch or Triton) serves these operands, or None when one does.

    Args:
        x: ``[N, in]`` activations.
        w: ``[E, out, in]`` weights.
        require_fast: kept for callers of the old signature; both values check the same faces.
    """
    face, reason = grouped_mm_face(x, w)
    return None if face != "loop" else reason


def grouped_mm_face(x: torch.Tensor, w: torch.Tensor) -> tuple[str, str]:
    """The face that runs these operands under the ``auto`` backend, and why the faster ones do not.

    Returns:
        ``(face, reason)``: face is one of :data:`FACES`; reason is empty for ``torch``.
    """
    torch_reason = _torch_face_reason(x, w)
    if torch_reason is None:
        return "torch", ""
    if x.device.type != "cuda":
        return "loop", torch_reason
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "loop", f"{torch_reason}; the Triton face does not take {x.dtype}"
    if not triton_available():
        return "loop", f"{torch_reason}, and Triton is not installed (pip install triton)"
    return "triton", torch_reason


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    torch's grouped GEMM backward rejects gradients with zero strides (e.g. from
    ``y.sum().backward()``), so the output hands it a dense gradient.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (a row-offset view may start mid-vector)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _torch_face(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    offs = tokens_per_expert.to(device=x.device).cumsum(0).to(torch.int32)  # [E] group ends
    w_t = _aligned(w).transpose(-2, -1)  # [E, in, out] view: no copy
    y = _torch_grouped_mm_fn()(_aligned(x), w_t, offs=offs)  # [N, out]
    return _ContiguousGrad.apply(y)


class _LoopGroupedMM(torch.autograd.Function):
    """Per-expert ``mm`` copied into one output; backward writes dX and dW into preallocated tensors.

    The forward copies each product instead of writing it with ``out=``: a selective checkpoint
    keeps matmul outputs, and ``out=`` views of one buffer would share a version counter that
    every later expert's write bumps (torch then refuses the cached tensors in recompute).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        y = x.new_empty(x.shape[0], w.shape[1])  # [N, out]
        start = 0
        for e, n in enumerate(counts):
            if n:
                y[start : start + n].copy_(torch.mm(x[start : start + n], w[e].t()))
            start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # [N, out]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None  # [N, in]: every row belongs to one expert
        grad_w = torch.empty_like(w) if need_w else None  # [E, out, in]
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if need_x and n:
                torch.mm(grad_y[rows], w[e], out=grad_x[rows])
            if need_w:
                if n:
                    torch.mm(grad_y[rows].t(), x[rows], out=grad_w[e])
                else:
                    grad_w[e].zero_()
            start += n
        return grad_x, grad_w, None


def _check_counts(tokens_per_expert: object, num_experts: int, num_rows: int) -> torch.Tensor:
    op = "grouped_mm"
    expect = f"an int tensor [E] with E = {num_experts}"
    check_tensor(op, "tokens_per_expert", tokens_per_expert, expect=expect, ndim=1, dtypes=_INT_DTYPES)
    if tokens_per_expert.shape[0] != num_experts:
        raise ValueError(f"{op}: tokens_per_expert must be {expect}, got {describe(tokens_per_expert)}")
    if tokens_per_expert.device.type == "cpu":  # checking a device tensor would cost a sync
        total = int(tokens_per_expert.sum())
        if total != num_rows or bool((tokens_per_expert < 0).any()):
            raise ValueError(
                f"{op}: tokens_per_expert must be >= 0 and sum to x.shape[0] = {num_rows}, "
                f"got {tokens_per_expert.tolist()}"
            )
    return tokens_per_expert


def run_face(face: str, x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Runs one named face without checks (tests and benchmarks compare faces with this)."""
    if face == "torch":
        return _torch_face(x, w, tokens_per_expert)
    if face == "triton":
        from megatron_lite.ops import triton_grouped_mm

        return triton_grouped_mm.grouped_mm(x, w, tokens_per_expert)
    if face == "loop":
        return _LoopGroupedMM.apply(x, w, tuple(int(n) for n in tokens_per_expert.tolist()))
    raise ValueError(f"grouped_mm: face must be one of {FACES}, got {face!r}")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Applies expert ``e``'s ``nn.Linear`` weight to its block of rows: ``y_e = x_e @ w[e].T``.

    Args:
        x: ``[N, in]`` float tensor, rows grouped by expert in expert order (as produced by
            :func:`moe_permute`).
        w: ``[E, out, in]`` per-expert weights (``nn.Linear`` convention), same dtype as x.
        tokens_per_expert: int32/int64 ``[E]`` rows per expert, summing to ``N``; zeros allowed.
            May live on the host or on x's device (validated only when on the host).

    Returns:
        ``[N, out]`` in x's dtype, differentiable w.r.t. ``x`` and ``w``.

    Raises:
        TypeError: wrong dtypes. ValueError: shapes or counts that do not match.
        RuntimeError: backend forced to ``"compiled"`` but neither torch's grouped GEMM nor the
            Triton face can serve these operands.
    """
    op = "grouped_mm"
    check_tensor(op, "x", x, expect="a float tensor [N, in]", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w", w, expect="a float tensor [E, out, in]", ndim=3, dtypes=FLOAT_DTYPES)
    if w.shape[2] != x.shape[1] or w.shape[0] == 0 or w.dtype != x.dtype:
        raise ValueError(
            f"{op}: w must be [E, out, in] with E >= 1, in = x.shape[1] and x's dtype; "
            f"got x {describe(x)}, w {describe(w)}"
        )
    check_same_device(op, "w", w, "x", x)
    _check_counts(tokens_per_expert, w.shape[0], x.shape[0])
    backend = _backend.get_backend()
    if backend == "reference" or x.shape[0] == 0:  # nothing to multiply: no kernel needed
        return reference.grouped_mm(x, w, tokens_per_expert)
    face, reason = grouped_mm_face(x, w)
    if face == "loop":
        if backend == "compiled":
            raise RuntimeError(f"{op}: backend 'compiled' was requested but {reason}")
        if x.device.type == "cuda":  # a GPU without a grouped GEMM pays a host sync per call
            _backend.warn_once(op, f"{op}: using the per-expert loop because {reason}")
    return run_face(face, x, w, tokens_per_expert)

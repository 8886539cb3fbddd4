"""Public wrapper of the per-expert grouped matmul.

Its "compiled face" is ``torch._grouped_mm`` (ATen's grouped GEMM: CUTLASS on sm90+, bf16,
16-byte aligned rows); the reference is a loop of ``E`` matmuls over ``torch.split`` chunks,
which autograd differentiates for free. ``torch._grouped_mm`` is a private API whose support
differs by torch version, device and dtype, so it is used only where all of these hold.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_lite.ops import _backend, reference
from megatron_lite.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, describe

_INT_DTYPES = (torch.int32, torch.int64)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    ``torch._grouped_mm``'s backward rejects gradients with zero strides (e.g. from
    ``y.sum().backward()``), so the output hands it a dense gradient.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_unusable_reason(x: torch.Tensor, w: torch.Tensor, *, require_fast: bool = True) -> str | None:
    """Why ``torch._grouped_mm`` should not run for these operands, or None when it should.

    Args:
        x: ``[N, in]`` activations.
        w: ``[E, out, in]`` weights.
        require_fast: also require a device where it is the fast kernel (CUDA sm90+, not ROCm);
            False only checks that the call is valid (used when the backend is forced).
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return f"torch._grouped_mm needs bf16 operands, got x {x.dtype} and w {w.dtype}"
    if x.shape[1] % 8 or w.shape[1] % 8:
        return f"torch._grouped_mm needs in/out features divisible by 8, got in={x.shape[1]} out={w.shape[1]}"
    if not require_fast:
        return None
    if x.device.type != "cuda":
        return f"torch._grouped_mm is only the fast path on CUDA, got {x.device.type}"
    if torch.version.hip is not None:
        return "torch._grouped_mm is not used on ROCm"
    major, minor = torch.cuda.get_device_capability(x.device)
    if major < 9:
        return f"torch._grouped_mm's grouped GEMM kernel needs sm90+, got sm{major}{minor}"
    return None


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
        RuntimeError: backend forced to ``"compiled"`` but ``torch._grouped_mm`` is unusable.
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
    reason = grouped_mm_unusable_reason(x, w, require_fast=backend == "auto")
    if reason is not None:
        if backend == "compiled":
            raise RuntimeError(f"{op}: backend 'compiled' was requested but {reason}")
        if x.device.type == "cuda":  # on CPU the loop is the expected path, not a degradation
            _backend.warn_once(op, f"{op}: using the per-expert loop because {reason}")
        return reference.grouped_mm(x, w, tokens_per_expert)
    offs = tokens_per_expert.to(device=x.device).cumsum(0).to(torch.int32)  # [E] group ends
    y = torch._grouped_mm(x.contiguous(), w.contiguous().transpose(-2, -1), offs=offs)  # [N, out]
    return _ContiguousGrad.apply(y)

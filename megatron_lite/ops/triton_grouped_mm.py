"""Triton face of ``grouped_mm``: for CUDA/ROCm GPUs where torch has no fast grouped GEMM.

The only import of ``triton``; imported lazily by :mod:`megatron_lite.ops.grouped_mm` when this
face is chosen. Three GEMMs, all without a host sync (the counts stay on the device):

* forward ``y_e = x_e @ w[e]^T`` and dX ``gx_e = gy_e @ w[e]`` share one kernel over row tiles:
  each program owns ``BLOCK_M`` rows of one expert, found through a tile map built with torch ops
  on the device (``cdiv(N, BLOCK_M) + E`` tiles bound the ragged total; spare tiles exit at once);
* dW ``gw[e] = gy_e^T @ x_e`` runs one program per (expert, out tile, in tile), looping over that
  expert's rows; an expert with no rows writes zeros.

Accumulation is fp32; outputs take the input dtype. Under ``TRITON_INTERPRET=1`` (set before this
module is imported) the kernels run on CPU tensors in fp32/fp16, which is how CI tests them.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# Tile sizes for GPUs; tests pass smaller ones (the interpreter runs one program at a time).
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _rows_gemm_kernel(
    a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr,
    K, NC,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """C[rows of e] = A[rows of e] @ B_e for one (row tile, column tile); B_e read through strides."""
    e = tl.load(tile_expert_ptr + tl.program_id(0))
    if e < 0:  # a spare tile beyond the ragged total
        return
    row0 = tl.load(tile_row_ptr + tl.program_id(0))
    row_end = tl.load(ends_ptr + e)
    rows = row0 + tl.arange(0, BM)  # [BM]
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)  # [BK]
        a_mask = (rows[:, None] < row_end) & (ks[None, :] < K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
        b_ptrs = b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b = tl.load(b_ptrs, mask=(ks[:, None] < K) & (cols[None, :] < NC), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")  # [BM, BN]
        else:
            acc += tl.dot(a, b)
    c_mask = (rows[:, None] < row_end) & (cols[None, :] < NC)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _weight_grad_kernel(
    gy_ptr, x_ptr, gw_ptr, ends_ptr, counts_ptr,
    OUT, IN,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_we, stride_wo, stride_wi,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """gw[e][o tile, i tile] = sum over expert e's rows r of gy[r, o] * x[r, i]."""
    e = tl.program_id(0)
    end = tl.load(ends_ptr + e)
    start = end - tl.load(counts_ptr + e)
    o = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM] output features
    i = tl.program_id(2) * BN + tl.arange(0, BN)  # [BN] input features
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        r = r0 + tl.arange(0, BK)  # [BK] rows of expert e
        gy_t = tl.load(  # [BM, BK]: gy transposed through its strides
            gy_ptr + r[None, :] * stride_gm + o[:, None] * stride_gn,
            mask=(r[None, :] < end) & (o[:, None] < OUT),
            other=0.0,
        )
        xb = tl.load(  # [BK, BN]
            x_ptr + r[:, None] * stride_xm + i[None, :] * stride_xk,
            mask=(r[:, None] < end) & (i[None, :] < IN),
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(gy_t, xb, input_precision="ieee")
        else:
            acc += tl.dot(gy_t, xb)
    w_ptrs = gw_ptr + e * stride_we + o[:, None] * stride_wo + i[None, :] * stride_wi
    tl.store(w_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=(o[:, None] < OUT) & (i[None, :] < IN))


def tile_map(
    counts: torch.Tensor, num_rows: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of the ragged groups, computed on the counts' device (no host sync).

    Args:
        counts: int64 ``[E]`` rows per expert, on the GPU.
        num_rows: ``N = sum(counts)``, known on the host from x's shape.
        block_m: rows per tile.

    Returns:
        ``(tile_expert, tile_row, ends)``: int64 ``[cdiv(N, block_m) + E]`` expert of each tile
        (-1 for spare tiles) and its first row, and int64 ``[E]`` each expert's end row.
    """
    num_experts = counts.shape[0]
    ends = counts.cumsum(0)  # [E]
    tiles = (counts + block_m - 1) // block_m  # [E]
    tile_ends = tiles.cumsum(0)  # [E]
    t = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=counts.device)  # [T]
    expert = torch.searchsorted(tile_ends, t, right=True)  # [T]; E past the last real tile
    valid = expert < num_experts
    e = expert.clamp(max=num_experts - 1)
    row = (ends - counts)[e] + (t - (tile_ends - tiles)[e]) * block_m  # [T]
    return torch.where(valid, e, -1), row, ends


def _rows_gemm(a, b, b_strides, nc, counts, blocks) -> torch.Tensor:
    """``C[rows of e] = A[rows of e] @ B_e`` with ``B_e`` ``[K, nc]`` read through ``b_strides``."""
    bm, bn, bk = blocks
    tile_expert, tile_row, ends = tile_map(counts, a.shape[0], bm)
    c = a.new_empty(a.shape[0], nc)
    grid = (tile_expert.shape[0], triton.cdiv(nc, bn))
    _rows_gemm_kernel[grid](
        a, b, c, tile_expert, tile_row, ends, a.shape[1], nc,
        a.stride(0), a.stride(1), *b_strides, c.stride(0), c.stride(1),
        IEEE=_ieee(a), BM=bm, BN=bn, BK=bk,
    )  # fmt: skip
    return c


def _ieee(t: torch.Tensor) -> bool:
    """fp32 inputs get exact fp32 products unless the user allowed TF32 for matmuls (as torch does)."""
    return t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, blocks) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        # B_e = w[e]^T: [in, out], so k walks w's last dim and n its middle one.
        y = _rows_gemm(x, w, (w.stride(0), w.stride(2), w.stride(1)), w.shape[1], counts, blocks)
        ctx.save_for_backward(x, w, counts)
        ctx.blocks = blocks
        return y  # [N, out]

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, w, counts = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # [N, out]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # gx_e = gy_e @ w[e]: B_e = w[e], [out, in]
            b_strides = (w.stride(0), w.stride(1), w.stride(2))
            grad_x = _rows_gemm(grad_y, w, b_strides, w.shape[2], counts, ctx.blocks)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)  # [E, out, in]; every element is written (zeros for idle experts)
            bm, bn, bk = ctx.blocks
            ends = counts.cumsum(0)
            grid = (w.shape[0], triton.cdiv(w.shape[1], bm), triton.cdiv(w.shape[2], bn))
            _weight_grad_kernel[grid](
                grad_y, x, grad_w, ends, counts, w.shape[1], w.shape[2],
                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
                grad_w.stride(0), grad_w.stride(1), grad_w.stride(2),
                IEEE=_ieee(x), BM=bm, BN=bn, BK=bk,
            )  # fmt: skip
        return grad_x, grad_w, None, None


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    blocks: tuple[int, int, int] = (BLOCK_M, BLOCK_N, BLOCK_K),
) -> torch.Tensor:
    """``y_e = x_e @ w[e]^T`` for expert-grouped rows ``x`` ``[N, in]`` and ``w`` ``[E, out, in]``.

    Args:
        x: ``[N, in]`` fp32/fp16/bf16 rows in expert order.
        w: ``[E, out, in]`` in x's dtype.
        tokens_per_expert: int ``[E]`` rows per expert (moved to x's device; never read on the host).
        blocks: ``(BLOCK_M, BLOCK_N, BLOCK_K)`` tile sizes, each >= 16.

    Returns:
        ``[N, out]``, differentiable w.r.t. ``x`` and ``w``.
    """
    counts = tokens_per_expert.to(device=x.device, dtype=torch.int64)
    return _TritonGroupedMM.apply(x, w, counts, tuple(blocks))

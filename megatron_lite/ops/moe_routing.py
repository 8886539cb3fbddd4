"""Public wrappers of the MoE routing ops: top-k softmax, permute, unpermute.

The compiled faces are wrapped in autograd Functions whose backward also runs compiled kernels
(permute backward is an unweighted unpermute; unpermute backward is one fused kernel). The
top-k backward is a few vectorised torch ops on ``[T, k]`` tensors, cheap on any device.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_lite.ops import reference
from megatron_lite.ops._backend import compiled_module
from megatron_lite.ops._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor, describe


class _TopkSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, k: int, kernels: Any) -> tuple[torch.Tensor, ...]:
        weights, indices, tokens_per_expert = kernels.moe_topk_softmax(logits, k)
        ctx.save_for_backward(weights, indices)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.mark_non_differentiable(indices, tokens_per_expert)
        return weights, indices, tokens_per_expert

    @staticmethod
    def backward(ctx: Any, grad_weights: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, None, None]:
        weights, indices = ctx.saved_tensors  # [T, k] each
        # w = softmax over the selected logits (the full normaliser cancels), so
        # dL/dl_i = w_i * (g_i - sum_j w_j g_j) for selected i and 0 for the rest.
        g = grad_weights.float()
        grad_picked = weights * (g - (weights * g).sum(dim=-1, keepdim=True))  # [T, k]
        grad_logits = torch.zeros(ctx.logits_shape, dtype=torch.float32, device=weights.device)
        grad_logits.scatter_(1, indices, grad_picked)  # [T, E]
        return grad_logits.to(ctx.logits_dtype), None, None


def moe_topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtral router: softmax over all E experts in fp32, top-k, renormalise the k weights.

    Ties: experts are ranked by fp32 logit, larger first; equal logits go to the lower expert
    index first (what a stable descending sort gives). All faces select on the logits, so
    ``indices`` agree exactly. Note that ``torch.topk`` breaks ties differently (not always the
    lower index), so do not compare against it on tied inputs. NaN logits give unspecified
    (but in-bounds) results.

    Args:
        logits: ``[T, E]`` router logits, any float dtype.
        k: experts per token, ``1 <= k <= E``.

    Returns:
        ``(weights, indices, tokens_per_expert)``: weights float32 ``[T, k]`` summing to 1 per
        token in pick order (descending), differentiable w.r.t. ``logits``; indices int64
        ``[T, k]``; tokens_per_expert int64 ``[E]`` (how many (token, slot) pairs chose each
        expert).

    Raises:
        TypeError: logits is not a float tensor or k is not an int.
        ValueError: logits is not 2-D or has no experts, or k is outside ``[1, E]``.
    """
    op = "moe_topk_softmax"
    check_tensor(op, "logits", logits, expect="a float tensor [T, E]", ndim=2, dtypes=FLOAT_DTYPES)
    num_experts = logits.shape[1]
    if num_experts == 0:
        raise ValueError(f"{op}: logits must have at least one expert column, got {describe(logits)}")
    check_int(op, "k", k, low=1, high=num_experts)
    kernels = compiled_module(op, logits.device)
    if kernels is None:
        return reference.moe_topk_softmax(logits, k)
    logits = logits.contiguous()
    if logits.requires_grad and torch.is_grad_enabled():
        return _TopkSoftmax.apply(logits, k, kernels)
    return kernels.moe_topk_softmax(logits, k)


def _check_indices(op: str, indices: object, num_tokens: int) -> torch.Tensor:
    check_tensor(op, "indices", indices, expect="int64 [T, k]", ndim=2, dtypes=(torch.int64,))
    if indices.shape[0] != num_tokens or indices.shape[1] == 0:
        raise ValueError(
            f"{op}: indices must be int64 [T, k] with T = {num_tokens} and k >= 1, got {describe(indices)}"
        )
    return indices


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, indices: torch.Tensor, kernels: Any) -> tuple[torch.Tensor, ...]:
        permuted, row_map = kernels.moe_permute(x, indices)
        ctx.save_for_backward(row_map)
        ctx.k, ctx.kernels = indices.shape[1], kernels
        ctx.mark_non_differentiable(row_map)
        return permuted, row_map

    @staticmethod
    def backward(ctx: Any, grad_permuted: torch.Tensor, _: Any) -> tuple[torch.Tensor, None, None]:
        (row_map,) = ctx.saved_tensors
        # Each token's copies are summed back: an unpermute with unit weights.
        grad_x = ctx.kernels.moe_unpermute(grad_permuted.contiguous(), row_map, None, ctx.k)
        return grad_x, None, None


def moe_permute(x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies each token once per chosen expert, grouped by expert in expert order.

    Within one expert the copies stay in token order (stable), so the result is deterministic.

    Args:
        x: ``[T, H]`` float tensor.
        indices: int64 ``[T, k]`` expert ids (non-negative), e.g. from :func:`moe_topk_softmax`.

    Returns:
        ``(permuted, row_map)``: permuted ``[T*k, H]``; row_map int64 ``[T*k]`` encodes the
        source of each permuted row as ``t * k + j`` (token ``row_map // k``, slot
        ``row_map % k``), i.e. it is the stable argsort of ``indices.flatten()``. Gradients of
        ``permuted`` flow back to ``x`` summed over slots.

    Raises:
        TypeError: wrong dtypes. ValueError: wrong shapes, devices, or negative expert ids
        (the last one checked by the CPU kernel only).
    """
    op = "moe_permute"
    check_tensor(op, "x", x, expect="a float tensor [T, H]", ndim=2, dtypes=FLOAT_DTYPES)
    _check_indices(op, indices, x.shape[0])
    check_same_device(op, "indices", indices, "x", x)
    if indices.numel() and indices.device.type == "cpu" and int(indices.min()) < 0:
        raise ValueError(f"{op}: indices must be >= 0, got {int(indices.min())}")
    kernels = compiled_module(op, x.device)
    if kernels is None:
        return reference.moe_permute(x, indices)
    return _Permute.apply(x.contiguous(), indices.contiguous(), kernels)


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, kernels: Any
    ) -> torch.Tensor:
        k = weights.shape[1]
        weights32 = weights.float().contiguous()
        out = kernels.moe_unpermute(permuted, row_map, weights32, k)
        ctx.save_for_backward(permuted, row_map, weights32)
        ctx.weights_dtype, ctx.kernels = weights.dtype, kernels
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        permuted, row_map, weights32 = ctx.saved_tensors
        need_w = ctx.needs_input_grad[2]
        grad_permuted, grad_w = ctx.kernels.moe_unpermute_backward(
            grad_out.contiguous(), permuted, row_map, weights32, weights32.shape[1], need_w
        )
        grad_w = grad_w.to(ctx.weights_dtype) if need_w else None
        grad_permuted = grad_permuted if ctx.needs_input_grad[0] else None
        return grad_permuted, None, grad_w, None


def moe_unpermute(permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order (inverse of permute).

    Args:
        permuted: ``[T*k, H]`` float tensor in the row order produced by :func:`moe_permute`.
        row_map: int64 ``[T*k]`` from :func:`moe_permute` (a permutation of ``[0, T*k)``).
        weights: float ``[T, k]`` routing weights (slot j of token t weighs the row from
            ``t * k + j``).

    Returns:
        ``[T, H]`` in the dtype of ``permuted``; ``out[t] = sum_j weights[t, j] *
        permuted[r]`` where ``row_map[r] == t * k + j``, accumulated in fp32. Differentiable
        w.r.t. ``permuted`` and ``weights``.

    Raises:
        TypeError: wrong dtypes. ValueError: shapes or devices that do not match.
    """
    op = "moe_unpermute"
    check_tensor(op, "permuted", permuted, expect="a float tensor [T*k, H]", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "row_map", row_map, expect="int64 [T*k]", ndim=1, dtypes=(torch.int64,))
    check_tensor(op, "weights", weights, expect="a float tensor [T, k]", ndim=2, dtypes=FLOAT_DTYPES)
    n = weights.shape[0] * weights.shape[1]
    if weights.shape[1] == 0 or row_map.shape[0] != n or permuted.shape[0] != n:
        raise ValueError(
            f"{op}: need weights [T, k] with k >= 1, row_map [T*k] and permuted [T*k, H]; got weights "
            f"{describe(weights)}, row_map {describe(row_map)}, permuted {describe(permuted)}"
        )
    check_same_device(op, "row_map", row_map, "permuted", permuted)
    check_same_device(op, "weights", weights, "permuted", permuted)
    kernels = compiled_module(op, permuted.device)
    if kernels is None:
        return reference.moe_unpermute(permuted, row_map, weights)
    return _Unpermute.apply(permuted.contiguous(), row_map.contiguous(), weights, kernels)

"""Fused ops for packed sequences and MoE routing, each with three faces.

Every op has a CUDA kernel (``csrc/cuda/``), a C++ CPU kernel (``csrc/*.cpp``), both compiled
into ``megatron_lite._C``, and a pure-torch reference (:mod:`megatron_lite.ops.reference`).
The functions here validate their inputs (errors name the argument, its dtype and shape), make
them contiguous, and dispatch: the compiled kernel when ``megatron_lite._C`` has it for the
tensor's device, otherwise the reference with a one-time warning per op. ``grouped_mm`` has its
own faces (torch's grouped GEMM, a Triton kernel for GPUs without one, an allocation-free loop;
see :mod:`megatron_lite.ops.grouped_mm`) and a per-expert loop as its reference.

Choose the face with :func:`set_backend` / :func:`use_backend`: ``"auto"`` (default),
``"compiled"`` (never fall back; raise instead) or ``"reference"``.

Public API::

    packed_seq_metadata(tokens, eod_id) -> (cu_seqlens, max_seqlen, position_ids, loss_mask)
    moe_topk_softmax(logits, k) -> (weights, indices, tokens_per_expert)
    moe_permute(x, indices) -> (permuted, row_map)        # row_map[r] = t * k + j
    moe_unpermute(permuted, row_map, weights) -> out
    grouped_mm(x, w, tokens_per_expert) -> y
"""

from megatron_lite.ops._backend import BACKENDS, get_backend, set_backend, use_backend
from megatron_lite.ops.grouped_mm import grouped_mm
from megatron_lite.ops.moe_routing import moe_permute, moe_topk_softmax, moe_unpermute
from megatron_lite.ops.packed_seq import packed_seq_metadata

__all__ = [
    "BACKENDS",
    "get_backend",
    "grouped_mm",
    "moe_permute",
    "moe_topk_softmax",
    "moe_unpermute",
    "packed_seq_metadata",
    "set_backend",
    "use_backend",
]

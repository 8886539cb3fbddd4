"""Attention across context-parallel ranks: all-gather K/V per layer (the Llama 3 approach).

Each cp rank holds two load-balanced chunks of every sequence (``parallel.context``). A layer

1. all-gathers its local K and V over the cp group (in the compute dtype: bf16 under bf16
   training) and puts the gathered chunks back in sequence order -> K/V of the whole sequence;
2. builds the mask of its local queries against all keys from *global* indices: causal
   (``key <= query``), same document (document ids read from the full-row ``cu_seqlens``) and
   the sliding window (``query - key < window``) -> ``[b, 1, s/cp, s]``;
3. runs the attention kernel on local q vs the full k/v;
4. in backward, the gathered K/V's gradient on every rank is that rank's queries' share; the
   all-gather's backward reduce-scatters it, so each owner receives the sum over all queries.
   The query path's gradient stays local.

Why all-gather and not ring attention: with document masks and sliding windows the ring's
per-step block skipping and the online-softmax merge of partial results must be derived for
every mask kind, and the ring's communication overlap only pays off when attention compute
dominates (long chunks on GPUs). The all-gather computes exactly one kernel call per layer with
an ordinary mask, so it is exact for every mask this framework supports and reuses the existing
backend. Its cost: each rank holds one layer's full K/V (``2 * b * s * nkv * hd`` elements, small
under GQA) for the duration of the layer's backward, and the gather is not overlapped.

Backends: the mask is an arbitrary ``[s/cp, s]`` pattern, so it runs on SDPA with an explicit
additive mask (``sdpa_masked``, which ``auto`` picks under cp), built once per forward and shared
by the layers: ``s^2 / cp`` elements per rank, the same 1/cp share as the other activations.
flash-attn (one causal varlen call per local chunk) and FlexAttention (a block mask over global
positions) could serve it without a dense mask, but neither is built yet, so they are refused at
start (``training.runtime``) with one line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.models.common.attention_backends import document_ids
from megatron_lite.parallel import comm
from megatron_lite.parallel.context import ContextParallel, gathered_order, global_positions

CP_BACKENDS = ("auto", "sdpa_masked")  # the requested backends that can serve cp


def cp_mask(
    cp: ContextParallel,
    cu_seqlens: torch.Tensor | None,
    b: int,
    local_len: int,
    window: int | None,
    device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Additive ``[b, 1, s/cp, s]`` mask in ``dtype`` (0 where a local query sees a key, -inf not).

    Additive, not boolean: SDPA converts a boolean mask to a float copy on every call and keeps it
    for backward, one ``[s/cp, s]`` copy per layer; a float mask built once per forward is the
    single copy every layer shares.
    """
    s = local_len * cp.size
    q_pos = global_positions(cp.rank, cp.size, local_len, device)  # [sl] global index of each query
    k_pos = torch.arange(s, device=device)  # [s]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [sl, s] causal
    if window is not None and window < s:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
    doc = document_ids(cu_seqlens, b, s, device)  # [b, s] over the full rows
    same_doc = doc[:, q_pos, None] == doc[:, None, :]  # [b, sl, s]
    keep = (allowed.unsqueeze(0) & same_doc).unsqueeze(1)  # [b, 1, sl, s]
    mask = torch.zeros(keep.shape, dtype=dtype or torch.float32, device=device)
    return mask.masked_fill_(~keep, float("-inf"))


def cp_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel, mask: torch.Tensor
) -> torch.Tensor:
    """Local queries ``[b, s/cp, nq, hd]`` over the whole sequence's keys -> ``[b, s/cp, nq, hd]``.

    Args:
        q, k, v: this rank's chunks (k, v ``[b, s/cp, nkv, hd]``).
        cp: the context-parallel group.
        mask: from :func:`cp_mask` (built once per forward, shared by the layers).
    """
    b, sl, nkv, hd = k.shape
    kv = torch.cat([k, v], dim=2)  # [b, sl, 2 nkv, hd]: one gather for both
    # forward all-gather along the sequence; backward reduce-scatter (every rank's queries add
    # to every key's gradient)
    kv = comm.gather_from_sequence(kv, cp.group, dim=1, reduce_grad=True)  # [b, s, 2 nkv, hd], rank order
    kv = kv.index_select(1, gathered_order(cp.size, sl, kv.device))  # sequence order
    k_all, v_all = kv.split([nkv, nkv], dim=2)  # [b, s, nkv, hd] each
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_all, v_all))  # [b, heads, s(/cp), hd]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)  # [b, nq, sl, hd]
    return out.transpose(1, 2)

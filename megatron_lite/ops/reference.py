"""Pure-torch reference faces of the ``megatron_lite.ops`` kernels.

Vectorised torch only (no Python loops over tokens), device-agnostic, differentiable through
plain autograd. They define the contracts the compiled faces are tested against and are the
fallback when ``megatron_lite._C`` is unavailable. Inputs are assumed validated by the public
wrappers in ``megatron_lite.ops``.
"""

from __future__ import annotations

import torch


def packed_seq_metadata(
    tokens: torch.Tensor, eod_id: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Document boundaries, position ids and loss mask of a packed batch.

    Every row starts a document; a document ends right after an EOD token. An EOD in the last
    column does not open an empty document, and a row without EOD is one document.

    Args:
        tokens: int64 ``[b, s]``.
        eod_id: the end-of-document token id.

    Returns:
        ``(cu_seqlens int32 [docs + 1], max_seqlen, position_ids int64 [b, s],
        loss_mask float32 [b, s])``; ``loss_mask`` is 0 where the token is EOD.
    """
    b, s = tokens.shape
    is_eod = tokens == eod_id  # [b, s]
    loss_mask = (~is_eod).to(torch.float32)
    if b == 0 or s == 0:
        empty_pos = torch.zeros((b, s), dtype=torch.int64, device=tokens.device)
        return torch.zeros(1, dtype=torch.int32, device=tokens.device), 0, empty_pos, loss_mask
    # A document starts at column 0 and right after every EOD that is not in the last column.
    starts = torch.zeros_like(is_eod)  # [b, s]
    starts[:, 0] = True
    starts[:, 1:] = is_eod[:, :-1]
    cols = torch.arange(s, device=tokens.device).expand(b, s)  # [b, s]
    # Column where the current document started: running max of the start columns.
    doc_start = torch.where(starts, cols, torch.zeros_like(cols)).cummax(dim=1).values
    position_ids = cols - doc_start  # [b, s]
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)  # [docs]
    total = torch.tensor([b * s], device=tokens.device)
    cu_seqlens = torch.cat([flat_starts, total]).to(torch.int32)  # [docs + 1]
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen, position_ids, loss_mask


def moe_topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts in fp32, top-k, renormalise the k weights.

    Order of the k picks: larger fp32 logit first; equal logits -> lower expert index first
    (a stable descending sort). ``torch.topk`` does not follow this rule on ties (on CPU it can
    return the higher index first), hence the sort. NaN logits give unspecified results.

    Args:
        logits: ``[T, E]``, any float dtype.
        k: experts per token, ``1 <= k <= E``.

    Returns:
        ``(weights float32 [T, k], indices int64 [T, k], tokens_per_expert int64 [E])``;
        ``weights`` is differentiable w.r.t. ``logits``.
    """
    scores = logits.float()  # [T, E]
    probs = torch.softmax(scores, dim=-1)  # [T, E]
    # Select on the logits, not on probs: distinct logits can round to equal probabilities.
    indices = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    picked = probs.gather(1, indices)  # [T, k]
    weights = picked / picked.sum(dim=-1, keepdim=True)
    tokens_per_expert = torch.bincount(indices.reshape(-1), minlength=logits.shape[1])  # [E]
    return weights, indices, tokens_per_expert


def moe_permute(x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the token copies by expert (stable: token order within an expert).

    Args:
        x: ``[T, H]``.
        indices: int64 ``[T, k]`` expert ids.

    Returns:
        ``(permuted [T*k, H], row_map int64 [T*k])``: ``permuted[r]`` is ``x[row_map[r] // k]``,
        the copy for slot ``row_map[r] % k``. Gradients of ``permuted`` sum back into ``x``.
    """
    k = indices.shape[1]
    row_map = torch.sort(indices.reshape(-1), stable=True).indices  # [T*k]
    permuted = x.index_select(0, torch.div(row_map, k, rounding_mode="floor"))  # [T*k, H]
    return permuted, row_map


def inverse_row_map(row_map: torch.Tensor) -> torch.Tensor:
    """``inv[row_map[r]] = r``: the permuted row of each (token, slot) in flat order."""
    inv = torch.empty_like(row_map)
    inv[row_map] = torch.arange(row_map.numel(), device=row_map.device)
    return inv


def moe_unpermute(permuted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order.

    Args:
        permuted: ``[T*k, H]`` as produced by :func:`moe_permute` (then run through experts).
        row_map: int64 ``[T*k]`` from :func:`moe_permute`.
        weights: ``[T, k]`` routing weights.

    Returns:
        ``[T, H]`` in the dtype of ``permuted``: ``out[t] = sum_j weights[t, j] * permuted[r(t, j)]``,
        accumulated in fp32. Differentiable w.r.t. ``permuted`` and ``weights``.
    """
    T, k = weights.shape
    H = permuted.shape[1]
    gathered = permuted.index_select(0, inverse_row_map(row_map)).view(T, k, H)  # [T, k, H]
    out = (gathered.float() * weights.float().unsqueeze(-1)).sum(dim=1)  # [T, H] fp32
    return out.to(permuted.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Per-expert ``nn.Linear`` on expert-grouped rows: a loop over experts.

    Args:
        x: ``[N, in]``, rows grouped by expert in expert order.
        w: ``[E, out, in]``.
        tokens_per_expert: int ``[E]`` summing to N (read on the host).

    Returns:
        ``[N, out]``. Experts with zero rows contribute nothing (and get zero weight grad).
    """
    splits = tokens_per_expert.tolist()
    chunks = torch.split(x, splits, dim=0)  # E x [n_e, in]
    outs = [chunk @ w[e].t() for e, chunk in enumerate(chunks)]  # E x [n_e, out]
    if not outs:  # E == 0 cannot happen after validation, but keep the shape right
        return x.new_empty((x.shape[0], w.shape[1]))
    return torch.cat(outs, dim=0)

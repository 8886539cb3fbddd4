"""From dataset samples to a training batch: inputs, labels, loss mask and packed-sequence metadata.

Megatron semantics, without dense attention masks:
  * ``reset_position_ids``: positions restart at 0 after every EOD token.
  * ``reset_attention_mask``: documents separated by EOD do not attend to each other; this is
    delivered as ``cu_seqlens`` (document boundaries over the flattened batch) for varlen
    attention kernels.
  * ``eod_mask_loss``: no loss where the *input* token is EOD.
A stored per-token loss mask (instruction data, aligned with the sample's tokens) masks the
positions whose *label* token is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One micro-batch; ``s`` is the model sequence length."""

    tokens: torch.Tensor  # int64 [b, s] model inputs
    labels: torch.Tensor  # int64 [b, s] next tokens
    loss_mask: torch.Tensor  # float32 [b, s]
    position_ids: torch.Tensor  # int64 [b, s]
    cu_seqlens: torch.Tensor | None  # int32 [docs + 1] over the flattened batch, or None
    max_seqlen: int  # longest document (s when documents are not separated)
    ref_logps: torch.Tensor | None = None  # fp32 [b] reference log-probs of each row (dpo only)


def _packed_seq_metadata():
    try:
        from megatron_lite.ops import packed_seq_metadata
    except ImportError as exc:
        raise ImportError(
            "make_batch needs megatron_lite.ops.packed_seq_metadata (not available yet)"
        ) from exc
    return packed_seq_metadata


def make_batch(
    tokens: torch.Tensor,
    eod_id: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    sample_loss_mask: torch.Tensor | None = None,
) -> Batch:
    """Split samples into inputs/labels and build the loss mask and packed-sequence metadata.

    Args:
        tokens: int [b, s + 1] samples as served by the dataset.
        eod_id: end-of-document token id.
        reset_position_ids: restart position ids after each EOD.
        reset_attention_mask: return ``cu_seqlens`` so documents do not attend across EOD.
        eod_mask_loss: zero the loss where the input token is EOD.
        sample_loss_mask: optional [b, s + 1] stored per-token mask (1 = train on this token);
            position ``j`` keeps its loss only when token ``j + 1`` (its label) is unmasked.

    Returns:
        A ``Batch``.
    """
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(
            f"tokens must be [batch, seq_length + 1] with seq_length >= 1, got {tuple(tokens.shape)}"
        )
    tokens = tokens.long()
    inputs = tokens[:, :-1].contiguous()  # [b, s]
    labels = tokens[:, 1:].contiguous()  # [b, s]
    b, s = inputs.shape
    cu_seqlens, max_seqlen = None, s
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s).contiguous()
    if reset_position_ids or reset_attention_mask:
        cu, longest, doc_positions, _ = _packed_seq_metadata()(inputs, int(eod_id))
        if reset_position_ids:
            position_ids = doc_positions
        if reset_attention_mask:
            cu_seqlens, max_seqlen = cu, int(longest)
    loss_mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss:
        loss_mask = (inputs != eod_id).float()
    if sample_loss_mask is not None:
        if tuple(sample_loss_mask.shape) != tuple(tokens.shape):
            raise ValueError(
                f"sample_loss_mask shape {tuple(sample_loss_mask.shape)} != tokens {tuple(tokens.shape)}"
            )
        loss_mask = loss_mask * sample_loss_mask[:, 1:].to(loss_mask)
    return Batch(inputs, labels, loss_mask, position_ids, cu_seqlens, max_seqlen)


def collate_samples(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack dataset items into ``{"tokens": int64 [b, s+1]}`` (+ ``"loss_mask"`` float32 [b, s+1]).

    Preference items hold two rows each (``tokens`` ``[2, s+1]``, ``ref_logps`` ``[2]``); they
    are flattened pair by pair, so pair ``i`` of the microbatch is rows ``2i`` (chosen) and
    ``2i + 1`` (rejected).
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")

    def stack(key, dtype):
        arr = np.stack([s[key] for s in samples]).astype(dtype)  # [b, s+1] or [b, 2, s+1]
        return torch.from_numpy(arr.reshape(-1, *arr.shape[2:]) if arr.ndim == 3 else arr)

    out = {"tokens": stack("tokens", np.int64)}
    if "loss_mask" in samples[0]:
        out["loss_mask"] = stack("loss_mask", np.float32)
    if "ref_logps" in samples[0]:
        ref = np.concatenate([s["ref_logps"] for s in samples]).astype(np.float32)  # [2 * pairs]
        out["ref_logps"] = torch.from_numpy(ref)
    return out

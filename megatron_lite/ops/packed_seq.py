"""Public wrapper of the packed-sequence metadata op."""

from __future__ import annotations

import torch

from megatron_lite.ops import reference
from megatron_lite.ops._backend import compiled_module
from megatron_lite.ops._checks import check_int, check_tensor

_INT32_MAX = 2**31 - 1


def packed_seq_metadata(
    tokens: torch.Tensor, eod_id: int
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Metadata for attention over documents packed into fixed-length rows.

    Every row starts a new document; a document ends right after its EOD token (the EOD
    belongs to the document it closes). An EOD in the last column does not open an empty
    document; a row without EOD is one document. One pass over the tokens.

    Example (``eod_id=0``)::

        tokens       [[5, 0, 7, 8],      cu_seqlens   [0, 2, 4, 5, 8]
                      [0, 9, 9, 0]]      max_seqlen   3
        position_ids [[0, 1, 0, 1],      loss_mask    [[1, 0, 1, 1],
                      [0, 0, 1, 2]]                    [0, 1, 1, 0]]

    Args:
        tokens: int64 ``[b, s]`` input token ids (the batch before the label shift).
        eod_id: the end-of-document token id.

    Returns:
        A tuple ``(cu_seqlens, max_seqlen, position_ids, loss_mask)``:
        ``cu_seqlens`` int32 ``[num_docs + 1]`` cumulative document lengths over the flattened
        batch (the format of flash-attn's varlen API); ``max_seqlen`` the longest document as a
        Python int (0 for an empty batch); ``position_ids`` int64 ``[b, s]`` restarting at 0 in
        every document; ``loss_mask`` float32 ``[b, s]``, 0 where the token is EOD.

    Raises:
        TypeError: ``tokens`` is not an int64 tensor or ``eod_id`` is not an int.
        ValueError: ``tokens`` is not 2-D or ``b * s`` does not fit in int32.
    """
    op = "packed_seq_metadata"
    check_tensor(op, "tokens", tokens, expect="int64 [b, s]", ndim=2, dtypes=(torch.int64,))
    check_int(op, "eod_id", eod_id, low=-(2**63), high=2**63 - 1)
    if tokens.numel() >= _INT32_MAX:
        raise ValueError(
            f"{op}: tokens has {tokens.numel()} elements; cu_seqlens is int32, so b * s "
            f"must be < {_INT32_MAX}"
        )
    tokens = tokens.contiguous()
    kernels = compiled_module(op, tokens.device)
    if kernels is None:
        return reference.packed_seq_metadata(tokens, eod_id)
    cu_seqlens, max_seqlen, position_ids, loss_mask = kernels.packed_seq_metadata(tokens, eod_id)
    return cu_seqlens, int(max_seqlen), position_ids, loss_mask

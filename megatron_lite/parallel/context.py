"""Context parallelism (cp): the sequence of every sample split over the ranks of the ``cp`` group.

Load balancing: the sequence is cut into ``2 * cp`` equal chunks and cp rank ``i`` holds chunks
``i`` and ``2cp - 1 - i`` (Megatron's and Llama 3's layout). Under a causal mask the work of a
query chunk grows with its position, so pairing an early chunk with a late one gives every rank
the same attention work (with a contiguous split the last rank would do ``2cp - 1`` times the work
of the first).

Every per-token tensor of a batch (tokens, labels, loss mask, position ids) is split the same way
by :func:`shard_batch`; the packed-document boundaries (``cu_seqlens``, over the whole flattened
batch) stay global: attention needs every key's document, and it reads them from the full
boundaries with the global index of each local token (:func:`global_positions`).

The loss needs no change: each rank sums its tokens' losses, the trainer divides by the token
count summed over dp x cp, and gradients are summed over dp x cp (``grads.grad_reduce_groups``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_lite.parallel import comm


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group; the attention core reads it.

    Attributes:
        group: the cp process group (None on one process).
        rank: index in the group.
        size: cp.
    """

    group: object
    rank: int
    size: int


def chunk_ids(rank: int, size: int) -> tuple[int, int]:
    """The two of ``2 * size`` chunks that cp rank ``rank`` holds, in sequence order."""
    return rank, 2 * size - 1 - rank


def global_positions(rank: int, size: int, local_len: int, device=None) -> torch.Tensor:
    """Index in the full sequence of each of this rank's ``local_len`` tokens, int64 ``[local_len]``."""
    half = local_len // 2  # one chunk
    first, second = chunk_ids(rank, size)
    idx = torch.arange(half, device=device)
    return torch.cat([first * half + idx, second * half + idx])


def gathered_order(size: int, local_len: int, device=None) -> torch.Tensor:
    """Permutation that puts rank-ordered gathered chunks back in sequence order.

    All-gathering the local sequences of the cp ranks gives chunks ``0, 2cp-1, 1, 2cp-2, ...``;
    ``gathered[:, order]`` is the full sequence ``[b, s, ...]``.
    """
    pos = torch.cat([global_positions(r, size, local_len, device) for r in range(size)])  # [s]
    return torch.argsort(pos)


def split_sequence(t: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``t`` along ``dim`` (``[b, s, ...]`` -> ``[b, s/cp, ...]``)."""
    s = t.shape[dim]
    if s % (2 * size):
        raise ValueError(f"sequence length ({s}) is not divisible by 2 x context parallel ({size})")
    chunks = t.chunk(2 * size, dim=dim)
    first, second = chunk_ids(rank, size)
    return torch.cat([chunks[first], chunks[second]], dim=dim).contiguous()


def shard_batch(batch, rank: int, size: int):
    """A ``data.batching.Batch`` with this cp rank's tokens, labels, loss mask and positions.

    ``cu_seqlens`` and ``max_seqlen`` keep describing the full rows (see the module docstring).
    """
    if size == 1:
        return batch
    return dataclasses.replace(
        batch,
        tokens=split_sequence(batch.tokens, rank, size),
        labels=split_sequence(batch.labels, rank, size),
        loss_mask=split_sequence(batch.loss_mask, rank, size),
        position_ids=split_sequence(batch.position_ids, rank, size),
    )


def context_parallel_of(dims) -> ContextParallel | None:
    """The attention core's view of ``dims``' cp group, or None without context parallelism."""
    if dims.cp == 1:
        return None
    group = dims.group("cp")
    return ContextParallel(group, comm.group_rank(group), dims.cp)

"""Tensor-parallel layers that replace the plain model's nn.Linear / nn.Embedding.

Each keeps the attribute name ``weight`` so the canonical parameter names do not change, holds
only its local shard (laid out by ``parallel.sharding``) and talks to other ranks only through
``parallel.comm``. With sequence parallelism the activations between layers are sharded along
the sequence dim (``[b, s/tp, h]``): column-parallel layers all-gather their input and
row-parallel layers reduce-scatter their output; without it the activations are replicated and
the layers use copy_to_region / reduce_from_region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel import comm


class _SyncReplicaGrads(torch.autograd.Function):
    """Identity on a weight; backward sums the gradient of rows that several ranks hold.

    With fewer KV heads than TP ranks each KV head lives on ``tp // nkv`` ranks, each of which
    only sees its own query heads' contribution. Summing over the replicas gives every replica
    the full gradient, so they stay equal after the optimizer step. One all-reduce over the TP
    group suffices: each rank writes its rows into the slot of its head, zeros elsewhere.
    """

    @staticmethod
    def forward(ctx, weight, pieces, num_units, group):
        ctx.pieces, ctx.num_units, ctx.group = pieces, num_units, group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        rows = ctx.pieces[0][1] - ctx.pieces[0][0]
        # Summed in fp32 like every other gradient reduction (one rounding back to a bf16 grad).
        shape = (len(ctx.pieces), ctx.num_units, rows, *grad.shape[1:])
        buf = grad.new_zeros(shape, dtype=torch.float32)
        for i, (start, end, unit) in enumerate(ctx.pieces):
            buf[i, unit] = grad[start:end]
        comm.all_reduce_(buf, ctx.group, tag="grad")
        for i, (start, end, unit) in enumerate(ctx.pieces):
            grad[start:end] = buf[i, unit]
        return grad, None, None, None


class ColumnParallelLinear(nn.Module):
    """``y_local = x @ W_local.T`` with the output features split over the TP group.

    Args:
        in_features: full input features.
        out_local: this rank's output rows (fused layouts are resolved by the sharding spec).
        group: tensor-parallel group.
        sequence_parallel: the input is ``[b, s/tp, h]`` and is all-gathered first.
        replicated_rows: ``(pieces, num_units)`` where ``pieces`` lists ``(start, end, unit)`` local
            row ranges that other TP ranks hold too (KV heads when ``nkv < tp``).
    """

    def __init__(
        self,
        in_features: int,
        out_local: int,
        group,
        sequence_parallel: bool,
        replicated_rows=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_local
        self.group, self.sequence_parallel = group, sequence_parallel
        self.replicated_rows = replicated_rows
        self.weight = nn.Parameter(torch.empty(out_local, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = comm.gather_from_sequence(x, self.group, dim=1)  # [b, s/tp, h] -> [b, s, h]
        else:
            x = comm.copy_to_region(x, self.group)  # [b, s, h]
        weight = self.weight
        if self.replicated_rows and comm.group_size(self.group) > 1:
            weight = _SyncReplicaGrads.apply(weight, *self.replicated_rows, self.group)
        return F.linear(x, weight)  # [b, s, out_local]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out_local={self.out_features}, sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """``y = sum_ranks x_local @ W_local.T`` with the input features split over the TP group."""

    def __init__(
        self, in_local: int, out_features: int, group, sequence_parallel: bool, device=None, dtype=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_local, out_features
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_local, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, in_local]
        partial = F.linear(x, self.weight)  # [b, s, h], this rank's share of the sum
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(partial, self.group, dim=1)  # [b, s/tp, h]
        return comm.reduce_from_region(partial, self.group)  # [b, s, h]

    def extra_repr(self) -> str:
        return f"in_local={self.in_features}, out={self.out_features}, sp={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over the TP group.

    Each rank looks up the ids that fall in its slice, zeros the others, and the partial
    embeddings are summed (reduce-scattered along the sequence under sequence parallel).
    """

    def __init__(
        self,
        num_local: int,
        embedding_dim: int,
        vocab_start: int,
        group,
        sequence_parallel: bool,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_local, self.embedding_dim, self.vocab_start = num_local, embedding_dim, vocab_start
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = nn.Parameter(torch.empty(num_local, embedding_dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [b, s]
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [b, s, h]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(out, self.group, dim=1)  # [b, s/tp, h]
        return comm.reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return f"rows={self.vocab_start}..{self.vocab_start + self.num_local}, sp={self.sequence_parallel}"


class VocabParallelOutput(nn.Module):
    """Output layer producing this rank's vocabulary slice of the logits, ``[b, s, V_pad / tp]``.

    With tied embeddings it owns no parameter and multiplies by the embedding's local shard
    (held by reference, outside the module tree, so ``output.weight`` never appears in the
    state dict). Padded vocabulary columns come out as 0; the vocab-parallel cross entropy
    ignores them, other consumers must mask ids >= the real vocabulary size.
    """

    def __init__(
        self,
        in_features: int,
        num_local: int,
        group,
        sequence_parallel: bool,
        tied_embedding: nn.Module | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.num_local = in_features, num_local
        self.group, self.sequence_parallel = group, sequence_parallel
        self._tied = (tied_embedding,) if tied_embedding is not None else None
        if tied_embedding is None:
            self.weight = nn.Parameter(torch.empty(num_local, in_features, device=device, dtype=dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            h = comm.gather_from_sequence(h, self.group, dim=1)  # [b, s, h]
        else:
            h = comm.copy_to_region(h, self.group)
        weight = self._tied[0].weight if self._tied is not None else self.weight
        return F.linear(h, weight)  # [b, s, V_local]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, vocab_local={self.num_local}, tied={self._tied is not None}"

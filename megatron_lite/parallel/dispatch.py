"""Expert-parallel token dispatchers for ``models.common.moe.MoE`` (same interface as LocalDispatcher).

    dispatch(x [T, h], indices [T, k], weights [T, k], tokens_per_expert [E])
        -> (expert_input [N, h] grouped by local expert, tokens_per_local_expert [E_local], ctx)
    combine(expert_output [N, h], ctx) -> [T, h]

``tokens_per_expert`` is the top-k op's count of this rank's (token, slot) pairs per global
expert; it is reused here (no second bincount). Tokens travel in ``x``'s dtype (the compute
dtype: bf16 under bf16 training); routing weights stay fp32. Each dispatch makes exactly one
device-to-host copy (split sizes must be host integers) and returns the local counts on the
host, which is where the per-expert GEMM loop wants them.

Experts are split over the EP group (ep rank j holds experts ``[j * E_local, (j + 1) * E_local)``)
and each expert's F dim over the ETP group. Every rank brings its own tokens (under tensor
parallelism MoE layers see sequence-split tokens), so tokens move only inside one ``etp x ep``
block of ranks.

* ``AllToAllDispatcher``: permute locally by expert, all-to-all over EP (each token copy goes to
  the rank of its expert), all-gather over ETP (every expert-TP shard needs all of its expert's
  tokens); combine reverses: reduce-scatter over ETP (sums the partial F-shard outputs),
  all-to-all back, weighted unpermute. Traffic is proportional to the routed tokens.
* ``AllGatherDispatcher``: all-gather every token of the block, compute the local experts on the
  copies routed to them, reduce-scatter the weighted outputs back. Simpler, more traffic; fine
  for small ep or when most tokens stay in the block anyway.

Both handle ranks that receive no tokens at all (zero-size expert inputs; the expert weights
still get a (zero) gradient through the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite import ops
from megatron_lite.parallel import comm


def _chunk_order(counts: torch.Tensor) -> torch.Tensor:
    """Row order that regroups chunks laid out ``(source, expert)`` into ``(expert, source)`` order.

    Args:
        counts: int64 ``[S, E]`` on the host: rows from source s for local expert e, stored
            source-major (as received).

    Returns:
        int64 ``[sum(counts)]``: new row i takes old row ``order[i]``.
    """
    flat = counts.flatten()
    starts = (flat.cumsum(0) - flat).view_as(counts)  # [S, E] first row of each chunk
    lens = counts.t().flatten()  # chunks in (expert, source) order
    chunk_starts = starts.t().flatten()
    total = int(lens.sum())
    new_starts = lens.cumsum(0) - lens
    return torch.repeat_interleave(chunk_starts - new_starts, lens, output_size=total) + torch.arange(total)


@dataclass
class _AllToAllCtx:
    row_map: torch.Tensor
    weights: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    etp_sizes: list[int]
    order: torch.Tensor


class AllToAllDispatcher:
    """Dispatch by all-to-all over the EP group (+ all-gather over ETP).

    Args:
        num_experts: global number of experts.
        ep_group: expert-parallel group (ranks holding different experts).
        etp_group: expert-tensor-parallel group (ranks holding F-shards of the same experts).
    """

    def __init__(self, num_experts: int, ep_group, etp_group):
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep, self.etp = comm.group_size(ep_group), comm.group_size(etp_group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by expert_parallel ({self.ep})")
        self.num_local = num_experts // self.ep

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, tokens_per_expert):
        """Send every token copy to the ranks holding its expert; see the module docstring."""
        permuted, row_map = ops.moe_permute(x, indices)  # [T*k, h] grouped by global expert
        counts = tokens_per_expert.view(self.ep, self.num_local)  # [ep, El] rows for each ep rank
        recv = comm.all_to_all_counts(counts, self.ep_group)  # [ep, El]: rows coming from each ep rank
        recv_all = comm.all_gather_stack(recv, self.etp_group)  # [etp, ep, El]
        # Split sizes must be host integers; this is the one device-to-host copy of the dispatch.
        host = torch.cat([counts.sum(1), recv_all.flatten()]).cpu()
        send_splits = host[: self.ep].tolist()
        recv_all = host[self.ep :].view(self.etp, self.ep, self.num_local)
        recv_splits = recv_all[comm.group_rank(self.etp_group)].sum(1).tolist()
        etp_sizes = recv_all.sum((1, 2)).tolist()
        h = comm.all_to_all(permuted, recv_splits, send_splits, self.ep_group)  # [n_ep, h] by (src, e)
        h = comm.all_gather_tokens(h, etp_sizes, self.etp_group)  # [n, h] by (etp src, ep src, e)
        order = _chunk_order(recv_all.view(-1, self.num_local))
        expert_in = h.index_select(0, order.to(h.device))  # [n, h] grouped by local expert
        tokens = recv_all.sum((0, 1))  # [El] on the host
        return expert_in, tokens, _AllToAllCtx(row_map, weights, send_splits, recv_splits, etp_sizes, order)

    def combine(self, expert_output: torch.Tensor, ctx: _AllToAllCtx) -> torch.Tensor:
        """Bring the outputs home and take each token's weighted sum -> ``[T, h]``."""
        inverse = torch.empty_like(ctx.order)
        inverse[ctx.order] = torch.arange(ctx.order.numel())
        y = expert_output.index_select(0, inverse.to(expert_output.device))  # back to (src, e) order
        y = comm.reduce_scatter_tokens(y, ctx.etp_sizes, self.etp_group)  # [n_ep, h], F-shards summed
        y = comm.all_to_all(y, ctx.send_splits, ctx.recv_splits, self.ep_group)  # [T*k, h]
        return ops.moe_unpermute(y, ctx.row_map, ctx.weights)


@dataclass
class _AllGatherCtx:
    slots: torch.Tensor
    tokens: torch.Tensor
    weights_all: torch.Tensor
    sizes: list[int]


class AllGatherDispatcher:
    """Dispatch by all-gathering the tokens of the ``etp x ep`` block.

    Args:
        num_experts: global number of experts.
        block_group: the ``etp_ep`` group (all ranks that exchange tokens).
        ep_rank: this rank's index in the EP group (which experts it holds).
        ep_size: expert-parallel size.
    """

    def __init__(self, num_experts: int, block_group, ep_rank: int, ep_size: int):
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by expert_parallel ({ep_size})")
        self.group = block_group
        self.num_local = num_experts // ep_size
        self.first = ep_rank * self.num_local

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, tokens_per_expert):
        """Gather all tokens, keep the copies routed to local experts, grouped by expert."""
        k = indices.shape[1]
        # Every rank's token count and tokens-per-expert in one collective and one host copy.
        meta = torch.cat([tokens_per_expert.new_tensor([x.shape[0]]), tokens_per_expert])  # [1 + E]
        meta = comm.all_gather_stack(meta, self.group).cpu()  # [g, 1 + E]
        sizes = meta[:, 0].tolist()
        # [El] on the host: copies routed to each local expert, from every rank of the block.
        tokens = meta[:, 1 + self.first : 1 + self.first + self.num_local].sum(0)
        x_all = comm.all_gather_tokens(x, sizes, self.group)  # [T_all, h]
        weights_all = comm.all_gather_tokens(weights, sizes, self.group, tag="stat")  # [T_all, k] fp32
        indices_all = comm.all_gather_tokens(indices, sizes, self.group, tag="stat")  # [T_all, k]
        local = indices_all.flatten() - self.first  # [T_all * k]
        mine = (local >= 0) & (local < self.num_local)
        # Sort the copies by local expert; copies of other ranks' experts get key num_local (last).
        key = torch.where(mine, local, self.num_local)
        slots = torch.sort(key, stable=True).indices[: int(tokens.sum())]  # flat t * k + j
        expert_in = x_all.index_select(0, torch.div(slots, k, rounding_mode="floor"))  # [N, h]
        return expert_in, tokens, _AllGatherCtx(slots, slots // k, weights_all, sizes)

    def combine(self, expert_output: torch.Tensor, ctx: _AllGatherCtx) -> torch.Tensor:
        """Weight the local experts' outputs, scatter them to their tokens, reduce-scatter -> ``[T, h]``."""
        w = ctx.weights_all.flatten().index_select(0, ctx.slots).float()  # [N]
        contrib = expert_output.float() * w.unsqueeze(-1)  # [N, h] fp32
        t_all, h = ctx.weights_all.shape[0], expert_output.shape[1]
        out = contrib.new_zeros((t_all, h)).index_add(0, ctx.tokens, contrib)  # [T_all, h]
        return comm.reduce_scatter_tokens(out.to(expert_output.dtype), ctx.sizes, self.group)

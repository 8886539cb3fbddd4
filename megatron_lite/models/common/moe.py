"""Mixtral sparse mixture of experts: softmax router, top-k, grouped expert GEMMs.

Token movement is delegated to a swappable dispatcher. ``LocalDispatcher`` keeps every expert on
this rank; expert parallelism (``megatron_lite.parallel``) installs all-to-all or all-gather
dispatchers with the same interface:

    dispatch(x [T, h], indices [T, k], weights [T, k], tokens_per_expert [E])
        -> (expert_input [N, h] grouped by local expert, tokens_per_local_expert [E_local], ctx)
    combine(expert_output [N, h], ctx) -> [T, h]

Precision: tokens are dispatched and the expert GEMMs run in the compute dtype (bf16 under bf16
training: bf16 on the wires, and ``torch._grouped_mm`` serves the GEMMs where it is fast); the
router runs its softmax and top-k in fp32. The tokens-per-expert counts come from the top-k op
once and are reused by dispatch, the expert GEMMs and the load-balancing loss (no bincount).

Device-to-host copies of one MoE layer (each is a sync on a GPU; nothing else reads device
values on the host, in forward or backward):

* ``AllToAllDispatcher.dispatch``: one copy of the send and receive counts, because
  ``all_to_all_single``'s split sizes and the expert-TP gather sizes must be host integers.
* ``AllGatherDispatcher.dispatch``: one copy of every block rank's token count and
  tokens-per-expert (gathered in one collective), for the gather sizes and the number of copies
  routed here (the length of the local expert input).
* ``GroupedExperts``: one copy of ``tokens_per_local_expert`` when the per-expert loop serves the
  GEMMs (no ``torch._grouped_mm`` fast path: it splits rows by host counts); shared by both GEMMs
  and their backward. With the fast path the counts stay on the device (group offsets). The
  dispatchers above already return host counts, so this copy happens only with the local one.
* The backward passes reuse the host split sizes saved by the forward: no copy.

Auxiliary losses (load balancing, router z-loss) are attached to the autograd graph by an
identity function, so nothing has to be returned through pipeline stages; their values are kept
detached on the module for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import ops
from megatron_lite.ops.grouped_mm import grouped_mm_unusable_reason


class GroupedExperts(nn.Module):
    """``num_local_experts`` SwiGLU experts stored as stacked weights.

    ``w13`` ``[E, 2F, H]`` holds each expert's [gate; up] rows, ``w2`` ``[E, H, F]`` its down
    projection (nn.Linear convention: ``[out, in]``).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        self.num_local_experts = num_experts
        self.w13 = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device, dtype=dtype)
        )
        self.w2 = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        )

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, H]`` grouped by expert, ``tokens_per_expert`` int64 ``[E_local]`` -> ``[N, H]``.

        Both GEMMs run in ``x``'s dtype: weights held in another dtype (fp32 weights under
        autocast) are cast to it, as autocast does for ``nn.Linear``.
        """
        w13, w2 = self.w13.to(x.dtype), self.w2.to(x.dtype)  # no-ops when the dtypes agree
        if tokens_per_expert.device.type != "cpu" and grouped_mm_unusable_reason(x, w13) is not None:
            tokens_per_expert = tokens_per_expert.cpu()  # the loop splits by host counts: copy once
        gate_up = ops.grouped_mm(x, w13, tokens_per_expert)  # [N, 2F]
        gate, up = gate_up.chunk(2, dim=-1)
        return ops.grouped_mm(F.silu(gate) * up, w2, tokens_per_expert)  # [N, H]


class LocalDispatcher:
    """All experts live here: permute tokens into expert order and back, no communication."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, tokens_per_expert):
        """Group the ``T * k`` token copies by expert (``tokens_per_expert`` ``[E]`` from top-k)."""
        permuted, row_map = ops.moe_permute(x, indices)  # [T*k, H]
        return permuted, tokens_per_expert, (row_map, weights)

    def combine(self, expert_output: torch.Tensor, ctx) -> torch.Tensor:
        """Weighted sum of each token's k expert outputs -> ``[T, H]``."""
        row_map, weights = ctx
        return ops.moe_unpermute(expert_output, row_map, weights)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; on backward, seeds ``aux_loss`` with gradient ``scale``.

    This adds ``scale * aux_loss`` to the objective without threading it through return values.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: autocast's when it is on, else the weights' (bf16 weights: bf16)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class MoE(nn.Module):
    """Router + experts + dispatcher. Routing as Mixtral: fp32 softmax over all experts, top-k, renormalise.

    Losses (per layer, summed over layers by autograd):
      * load balancing ``aux_loss_coeff * E / k * sum_e f_e * P_e`` where ``f_e`` is the fraction of
        tokens with a slot on expert e and ``P_e`` the mean router probability (1.0 when balanced);
      * router z-loss ``z_loss_coeff * mean_t logsumexp(logits_t)^2``.
    ``aux_loss_reduce`` sums the token statistics over the ranks that share this batch slice
    (identity on one rank; parallelize installs an all-reduce). ``aux_loss_scale`` is the weight the
    trainer gives one microbatch's loss (e.g. ``1 / num_microbatches``).
    """

    is_moe_layer = True  # how pipeline/ (which does not import models/) finds MoE layers

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        aux_loss_coeff: float = 0.0,
        z_loss_coeff: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coeff = aux_loss_coeff
        self.z_loss_coeff = z_loss_coeff
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        self.dispatcher = LocalDispatcher()
        self.aux_loss_reduce = _identity
        self.aux_loss_scale = 1.0
        self.last_aux_loss: torch.Tensor | None = None  # detached, for logging
        self.last_z_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        b, s, h = x.shape
        x_flat = x.reshape(b * s, h)  # [T, h]
        logits = self.router(x_flat).float()  # [T, E]
        # [T, k] fp32, [T, k] int64, [E] int64: the only count of tokens per expert.
        weights, indices, counts = ops.moe_topk_softmax(logits, self.top_k)
        # Tokens travel and meet the experts in the compute dtype (a no-op with bf16 weights).
        x_flat = x_flat.to(_compute_dtype(x_flat, self.experts.w13))
        expert_in, tokens_per_expert, ctx = self.dispatcher.dispatch(x_flat, indices, weights, counts)
        expert_out = self.experts(expert_in, tokens_per_expert)  # [N, h]
        out = self.dispatcher.combine(expert_out, ctx).to(x.dtype)  # [T, h]
        if self.training and (self.aux_loss_coeff > 0 or self.z_loss_coeff > 0):
            out = self._attach_losses(out, logits, counts)
        return out.view(b, s, h)

    def _attach_losses(self, out: torch.Tensor, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        num_tokens = logits.new_tensor([logits.shape[0]], dtype=torch.float32)
        probs_sum = torch.softmax(logits, dim=-1).sum(0)  # [E]
        counts = counts.float()  # [E] (token, slot) pairs per expert, from the top-k op
        z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum().reshape(1)
        stats = self.aux_loss_reduce(torch.cat([probs_sum, counts, z_sum, num_tokens]))
        probs_sum, counts = stats[: self.num_experts], stats[self.num_experts : 2 * self.num_experts]
        z_sum, total = stats[-2], stats[-1]
        balance = self.num_experts / self.top_k * torch.sum((counts / total) * (probs_sum / total))
        aux = self.aux_loss_coeff * balance + self.z_loss_coeff * z_sum / total
        self.last_aux_loss = balance.detach()
        self.last_z_loss = (z_sum / total).detach()
        return _AttachAuxLoss.apply(out, aux, self.aux_loss_scale)

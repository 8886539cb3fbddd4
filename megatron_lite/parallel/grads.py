"""Which groups each gradient is summed over, and a simple (non-bucketed) all-reduce of them.

Rules (by canonical name, from ``model.parallel_state``):
  * params whose gradient is partial over tp (norms under sequence parallel, the MoE router when
    tp > 1: each tp rank saw only its tokens) are summed over ``tp`` first;
  * expert params (sharded over ep/etp) are then summed over ``edp``; all others over ``dp_cp``
    (dp x cp: context-parallel ranks hold the same weights and saw other tokens of the samples).
KV rows replicated over tp (nkv < tp) are already summed in backward by the layer itself.

Gradients are SUMMED, not averaged: the loss is normalised by the global token count
(see ``cross_entropy.loss_fn``). ``allreduce_gradients`` reduces everything after the backward
when ``parallel.overlap_grad_reduce`` and ``parallel.distributed_optimizer`` are off; otherwise the
gradient buffers of ``grad_buffer`` reduce bucket by bucket with the same ``grad_reduce_groups``.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.parallel.comm import all_reduce_
from megatron_lite.parallel.sharding import shard_spec_for


def grad_reduce_groups(model: nn.Module, name: str) -> tuple[str, ...]:
    """The groups (in order) over which the gradient of canonical parameter ``name`` is summed."""
    state = getattr(model, "parallel_state", None)
    if state is None:
        return ("dp_cp",)
    first = ("tp",) if name in state.tp_partial_grads else ()
    expert = shard_spec_for(name, state.model_cfg).is_expert
    return first + (("edp",) if expert else ("dp_cp",))


@torch.no_grad()
def allreduce_gradients(model: nn.Module, dims) -> None:
    """Sum every gradient over its groups (one flat all-reduce per distinct group list).

    Missing gradients (e.g. an expert that received no token) count as zeros, so every rank
    takes part in the same collectives.
    """
    buckets: dict[tuple[str, ...], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets.setdefault(grad_reduce_groups(model, name), []).append(param)
    # Same names on every rank of a stage -> same bucket order -> matching collectives.
    for groups, params in buckets.items():
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        for group in groups:
            all_reduce_(flat, dims.group(group), tag="grad")
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

"""The model side of training: build the local model, recompute, masked loss, grad reduce, norm groups.

Every place where tensor/expert/data parallelism changes what happens is a function here; on one
process each one reduces to plain PyTorch. The model is always built on ``meta`` and only local
shards are materialised by ``materialize_local``, whose initial values depend on the canonical name
and global rows only: a run starts from the same weights whatever its (tp, ep, dp) layout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatron_lite.config import Config
from megatron_lite.models import build_model
from megatron_lite.models.common.transformer import Transformer, TransformerBlock
from megatron_lite.parallel.parallelize import materialize_local, parallelize
from megatron_lite.parallel.sharding import replicated_rows, shard_spec_for
from megatron_lite.pipeline.stages import (
    allreduce_embedding_grads,
    is_tied_embedding_copy,
    stage_layer_ids,
    stage_roles,
)
from megatron_lite.training.optimizer import NormGroup
from megatron_lite.training.runtime import Runtime


def build_local_model(cfg: Config, runtime: Runtime) -> Transformer:
    """This rank's fp32 model, initialised from ``training.seed``, with recompute applied.

    Several processes: parallelized (modules swapped for tensor/expert-parallel ones) before the
    local shards are allocated. One process: the plain model, same initial values. With pipeline
    parallelism: the layers of all this rank's virtual chunks under their global names, the
    embedding on the first stage, the head on the last (``pipeline.stages``).
    """
    dims = runtime.dims
    pp_rank = dims.local.pp
    pre_process, post_process = stage_roles(pp_rank, dims.pp)
    model = build_model(
        cfg.model,
        "meta",
        dtype=torch.float32,
        layer_ids=stage_layer_ids(cfg, pp_rank),
        pre_process=pre_process,
        post_process=post_process,
    )
    if runtime.distributed:
        model = parallelize(model, runtime.dims, cfg.parallel)
    materialize_local(model, runtime.dims, cfg.training.seed, device=runtime.device)
    model.attention_backend = cfg.training.attention_backend
    apply_recompute(model, cfg.training.recompute)
    if cfg.training.compile:
        apply_compile(model)
    return model


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` every ``TransformerBlock`` in place (torchtitan's per-block compile).

    Per block rather than the whole model: every block has the same code, so one compiled graph
    serves all layers (compile time does not grow with depth), and pipeline chunks, which call a
    subset of the blocks, need nothing special. Recomputation is applied first, so the compiled
    forward is the checkpointed one. Communication inside tensor/expert-parallel blocks and the
    extension's MoE routing ops are not traced: the graph breaks around them and they run as they
    do uncompiled.
    """
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile()


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Trade compute for activation memory, block by block.

    * ``full``: re-run each ``TransformerBlock``'s forward during backward; only block inputs are
      stored (Megatron's full recompute, ``uniform`` with one layer per group).
    * ``selective``: keep the outputs of the expensive ops (matmuls, grouped expert GEMMs,
      attention kernels) and recompute everything cheap between them (RMSNorm, RoPE, SiLU x up,
      residual adds, dtype casts): most of the memory of the pointwise intermediates is saved
      for a few percent of extra time. Megatron's ``selective`` recomputes only the core
      attention, which our fused attention kernels never materialise, so the cheap pointwise
      ops are the memory worth trading here (torchtitan's op-level selective policy).

    The block's ``forward`` is replaced on the instance (not wrapped in a new module), so parameter
    names, and therefore checkpoints, are unchanged. Non-reentrant checkpointing is used because it
    supports keyword arguments and inputs that do not require grad, and replays the MoE aux-loss
    attachment correctly.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"recompute mode {mode!r} is not supported (none, full, selective)")
    wrapper = _checkpointed if mode == "full" else _selectively_checkpointed
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "_recompute", False):
            module.forward = functools.partial(wrapper, module.forward)
            module._recompute = mode


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _op_set(names: tuple[str, ...]) -> frozenset:
    """The ``aten`` overload packets among ``names`` that this torch build has."""
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# Ops whose outputs selective recompute keeps: the matmuls and attention kernels (compute-bound).
SAVED_OPS = _op_set(
    (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
) | frozenset(  # FlexAttention is a higher-order op, not an aten one
    getattr(torch.ops.higher_order, n) for n in ("flex_attention",) if hasattr(torch.ops.higher_order, n)
)


# Attention kernels from optional packages, by qualified name (they exist only when installed):
# flash-attn 2.6+ registers its kernels as torch custom ops, flash-attn 3 (Hopper) under its own name.
SAVED_OP_NAMES = frozenset(
    {
        "flash_attn::_flash_attn_forward",
        "flash_attn::_flash_attn_varlen_forward",
        "flash_attn_3::_flash_attn_forward",
        "flash_attn_3::fwd",
    }
)


def selective_policy(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    """Keep the outputs of ``SAVED_OPS`` and ``SAVED_OP_NAMES``; recompute every other op in backward."""
    packet = getattr(op, "overloadpacket", op)
    if packet in SAVED_OPS or getattr(packet, "_qualified_op_name", None) in SAVED_OP_NAMES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selectively_checkpointed(forward, *args, **kwargs):
    context = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)


def masked_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, model: nn.Module
) -> torch.Tensor:
    """``sum(token cross entropy * loss_mask)`` in fp32 (a scalar with graph).

    A parallelized model has vocab-sharded (and padded) logits; the vocab-parallel cross entropy
    computes the same values without gathering them.
    """
    state = getattr(model, "parallel_state", None)
    if state is not None:
        from megatron_lite.parallel.cross_entropy import loss_fn

        return loss_fn(logits, labels, loss_mask, state.dims, state.model_cfg.vocab_size, num_tokens=1.0)
    b, s, v = logits.shape
    losses = F.cross_entropy(logits.float().reshape(b * s, v), labels.reshape(b * s), reduction="none")
    return (losses.view(b, s) * loss_mask.to(losses.dtype)).sum()


def reduce_gradients(model: nn.Module, runtime: Runtime, grad_sync=None) -> None:
    """SUM gradients over data-parallel replicas (and tp-partial ones over tp); no-op on one process.

    With gradient buffers (``grad_sync``, a ``parallel.grad_buffer.GradSync``) this completes their
    bucketed (possibly overlapped, possibly reduce-scattered) reduction instead. With pipeline
    parallelism, the tied embedding's gradient is then summed over its two copies (first and last
    stage).
    """
    if grad_sync is not None:
        grad_sync.finish_grad_sync()
        if runtime.distributed:
            allreduce_embedding_grads(model, runtime.dims)
    elif runtime.distributed:
        from megatron_lite.parallel.grads import allreduce_gradients

        allreduce_gradients(model, runtime.dims)
        allreduce_embedding_grads(model, runtime.dims)


def grad_norm_groups(model: nn.Module, runtime: Runtime) -> list[NormGroup]:
    """Parameters grouped by the ranks over which their squared gradient norms are summed.

    Runs on reduced gradients, which are identical across data-parallel replicas, so dense
    parameters sum over the model-parallel group (tp x pp) and expert parameters over the expert
    model-parallel group (etp x ep), then over the pipeline stages. A parameter replicated over
    tensor-parallel ranks counts on tensor rank 0 only; KV rows replicated over
    ``tp / num_kv_heads`` ranks count with weight ``1 / replicas`` on each; the last stage's copy
    of a tied embedding does not count (the first stage's does).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    state = getattr(model, "parallel_state", None)
    if state is None:
        return [NormGroup(params, None)]
    dims, coords = runtime.dims, runtime.dims.local
    dense = NormGroup(all_reduce=_reducer(dims.group("mp")))
    expert = NormGroup(
        all_reduce=_reducer(dims.group("etp_ep"), dims.group("pp") if dims.pp > 1 else None), dp_group="edp"
    )
    for name, param in model.named_parameters():
        if not param.requires_grad or is_tied_embedding_copy(model, name, dims.pp):
            continue
        spec = shard_spec_for(name, state.model_cfg)
        group = expert if spec.is_expert else dense
        if not spec.axes and coords.tp != 0 and not spec.is_expert:
            continue  # replicated over tp: tp rank 0 counts it
        group.params.append(param)
        shared = replicated_rows(spec, coords)
        if shared is not None:
            pieces, _units = shared
            weights = torch.ones(param.shape[0], device=param.device)
            replicas = coords.size("tp") // _units
            for start, end, _unit in pieces:
                weights[start:end] = 1.0 / replicas
            group.row_weights[id(param)] = weights
    return [dense, expert]


def _reducer(*groups):
    from megatron_lite.parallel import comm

    def all_reduce(t: torch.Tensor) -> None:
        for group in groups:
            if group is not None:
                comm.all_reduce(t, group)

    return all_reduce

"""Parallel styles: what ``parallelize`` does to one module of the plain model.

A plan maps module-name patterns to these styles; ``plan_from_table`` derives it from the
family's sharding table (one style per layout, ``styles_for_rule``), so a split is written down
once. Each style swaps or edits one module in place, keeping canonical parameter names; new
parameters get local shapes from ``parallel.sharding`` (on the meta device they stay empty,
on a real device they are sliced from the full weight). The layer classes the styles install
are chosen in one place, ``LinearLayers`` (a transformer-engine or FP8 set can replace them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.dispatch import AllGatherDispatcher, AllToAllDispatcher
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
)
from megatron_lite.parallel.sharding import (
    local_shape,
    padded_vocab_size,
    replicated_rows,
    shard_spec_for,
    shard_tensor,
)


@dataclass
class VocabShard:
    """This rank's slice of the (padded) vocabulary."""

    start: int
    num_local: int
    vocab_size: int  # real
    padded_size: int


@dataclass(frozen=True)
class LinearLayers:
    """The tensor-parallel layer classes the styles install (swap the set to change implementation)."""

    column: type = ColumnParallelLinear
    row: type = RowParallelLinear
    embedding: type = VocabParallelEmbedding
    output: type = VocabParallelOutput


@dataclass
class ParallelState:
    """Everything ``parallelize`` decided, kept on the model as ``model.parallel_state``."""

    dims: object  # ParallelDims
    parallel_cfg: object  # ParallelConfig
    model_cfg: object  # ModelConfig
    tp_partial_grads: set[str] = field(default_factory=set)  # grads to sum over tp before dp
    linears: LinearLayers = field(default_factory=LinearLayers)

    @property
    def coords(self):
        return self.dims.local

    @property
    def tp_group(self):
        return self.dims.group("tp")

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.parallel_cfg.sequence_parallel) and self.dims.tp > 1

    def vocab_shard(self) -> VocabShard:
        padded = padded_vocab_size(self.model_cfg.vocab_size, self.dims.tp)
        local = padded // self.dims.tp
        return VocabShard(self.coords.tp * local, local, self.model_cfg.vocab_size, padded)


def local_parameter(state: ParallelState, name: str, old: torch.Tensor) -> nn.Parameter:
    """This rank's shard of canonical parameter ``name``: empty on meta, else sliced from ``old``."""
    spec = shard_spec_for(name, state.model_cfg)
    if old.is_meta:
        data = torch.empty(local_shape(spec, state.coords), dtype=old.dtype, device="meta")
    else:
        data = shard_tensor(old.detach(), name, state.model_cfg, state.coords)
    return nn.Parameter(data, requires_grad=old.requires_grad)


class Style:
    """Transforms the module called ``name``; returns a replacement module or None (edited in place)."""

    def apply(self, name: str, module: nn.Module, state: ParallelState) -> nn.Module | None:
        raise NotImplementedError


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


class ColumnParallel(Style):
    """nn.Linear -> ColumnParallelLinear (fused QKV / gate-up layouts come from the sharding spec)."""

    def apply(self, name, module, state):
        weight_name = _join(name, "weight")
        spec = shard_spec_for(weight_name, state.model_cfg)
        out_local = local_shape(spec, state.coords)[0]
        new = state.linears.column(
            module.in_features,
            out_local,
            state.tp_group,
            state.sequence_parallel,
            replicated_rows(spec, state.coords),
            device="meta",
        )
        new.weight = local_parameter(state, weight_name, module.weight)
        return new


class RowParallel(Style):
    """nn.Linear -> RowParallelLinear."""

    def apply(self, name, module, state):
        weight_name = _join(name, "weight")
        spec = shard_spec_for(weight_name, state.model_cfg)
        new = state.linears.row(
            local_shape(spec, state.coords)[1],
            module.out_features,
            state.tp_group,
            state.sequence_parallel,
            device="meta",
        )
        new.weight = local_parameter(state, weight_name, module.weight)
        return new


class VocabEmbedding(Style):
    """nn.Embedding -> VocabParallelEmbedding over the padded vocabulary."""

    def apply(self, name, module, state):
        shard = state.vocab_shard()
        new = state.linears.embedding(
            shard.num_local,
            module.embedding_dim,
            shard.start,
            state.tp_group,
            state.sequence_parallel,
            device="meta",
        )
        new.weight = local_parameter(state, _join(name, "weight"), module.weight)
        return new


class VocabHead(Style):
    """On the model root: install a vocab-parallel ``output`` (tied to the embedding if configured)."""

    def apply(self, name, module, state):
        shard = state.vocab_shard()
        module.vocab_parallel = shard
        if not getattr(module, "post_process", True):
            return None
        args = (state.model_cfg.hidden_size, shard.num_local, state.tp_group, state.sequence_parallel)
        if module.output is None:  # tied: multiply by the (already swapped) embedding's shard
            module.output = state.linears.output(*args, tied_embedding=module.tok_embeddings)
            return None
        new = state.linears.output(*args, device="meta")
        new.weight = local_parameter(state, _join(name, "output.weight"), module.output.weight)
        module.output = new
        return None


class AttentionHeads(Style):
    """Set the attention module's head counts to the local ones (KV heads replicated when nkv < tp)."""

    def apply(self, name, module, state):
        tp = state.dims.tp
        module.num_heads = state.model_cfg.num_attention_heads // tp
        module.num_kv_heads = max(1, state.model_cfg.num_kv_heads // tp)
        return None


class SequenceParallelNorm(Style):
    """Norms stay as they are; under sequence parallel each rank sees only its tokens, so the
    weight's gradient is partial and must be summed over tp (``allreduce_gradients`` does it)."""

    def apply(self, name, module, state):
        if state.sequence_parallel:
            state.tp_partial_grads.add(_join(name, "weight"))
        return None


def _split_tokens(group, module, args):
    (x,) = args
    # Generation (no grad) feeds sequences of any length, one token per decode step: pad them with
    # zero tokens up to a multiple of tp (dropless routing, so pads never change real tokens'
    # outputs; only the routing statistics see them) and cut the pads off in _gather_tokens.
    # Training keeps the divisibility error, so its aux losses never count pad tokens.
    module._tp_seq_len = s = x.shape[1]
    extra = -s % comm.group_size(group)
    if extra and not torch.is_grad_enabled():
        x = nn.functional.pad(x, (0, 0, 0, extra))  # [b, s + extra, h]
    return (comm.scatter_to_sequence(x, group, dim=1),)  # [b, s/tp, h]


def _gather_tokens(group, module, args, out):
    # The consumer (residual stream) is replicated, so the backward only keeps this rank's chunk.
    out = comm.gather_from_sequence(out, group, dim=1, reduce_grad=False)  # [b, s + extra, h]
    return out[:, : module._tp_seq_len]  # [b, s, h]


class ExpertParallelMoE(Style):
    """Shard the experts over ep x etp, install the dispatcher and the aux-loss all-reduce.

    Under tensor parallelism the MoE layer works on sequence-split tokens: they already are with
    sequence parallel; without it, hooks split the replicated input and gather the output, so
    no token is routed twice. The router is then replicated over tp with partial gradients.
    """

    def apply(self, name, module, state):
        dims, cfg = state.dims, state.model_cfg
        experts = module.experts
        for attr in ("w13", "w2"):
            full_name = _join(name, f"experts.{attr}")
            setattr(experts, attr, local_parameter(state, full_name, getattr(experts, attr)))
        experts.num_local_experts = cfg.num_experts // dims.ep
        module.dispatcher = self._dispatcher(state)
        # Sum the routing statistics over every rank of the stage (they share the global batch),
        # so the aux and z losses equal the single-process ones. Backward is the identity: each
        # rank backpropagates its own tokens' share, and gradient summation adds the shares.
        group = dims.group("tp_dp")
        module.aux_loss_reduce = functools.partial(comm.reduce_from_region, group=group, tag="stat")
        if dims.tp > 1:
            state.tp_partial_grads.add(_join(name, "router.weight"))
            if not state.sequence_parallel:
                module.register_forward_pre_hook(functools.partial(_split_tokens, state.tp_group))
                module.register_forward_hook(functools.partial(_gather_tokens, state.tp_group))
        return None

    @staticmethod
    def _dispatcher(state: ParallelState):
        dims, kind = state.dims, getattr(state.parallel_cfg, "moe_dispatcher", "alltoall")
        num_experts = state.model_cfg.num_experts
        if kind == "alltoall":
            return AllToAllDispatcher(num_experts, dims.group("ep"), dims.group("etp"))
        if kind == "allgather":
            return AllGatherDispatcher(num_experts, dims.group("etp_ep"), state.coords.ep, dims.ep)
        raise ValueError(f"parallel.moe_dispatcher ({kind!r}) must be alltoall or allgather")


# ---------------------------------------------------------------- plans derived from a table


def styles_for_rule(rule) -> list[tuple[str, Style]]:
    """(module-name pattern, style) pairs that realise one sharding-table row.

    The module is the parameter's owner (``layers.*.attention.wqkv`` for
    ``layers.*.attention.wqkv.weight``); the fused QKV rule also sets the local head counts on
    the attention module, the expert rules shard the whole MoE layer (the experts' parent), and
    the output rule acts on the model root (a tied output has no parameter of its own).
    """
    owner = rule.pattern.rpartition(".")[0]
    parent = owner.rpartition(".")[0]
    return {
        "vocab_embedding": lambda: [(owner, VocabEmbedding())],
        "vocab_output": lambda: [("", VocabHead())],
        "norm": lambda: [(owner, SequenceParallelNorm())],
        "fused_qkv": lambda: [(parent, AttentionHeads()), (owner, ColumnParallel())],
        "fused_gate_up": lambda: [(owner, ColumnParallel())],
        "row_heads": lambda: [(owner, RowParallel())],
        "row": lambda: [(owner, RowParallel())],
        "router": lambda: [],  # replicated; ExpertParallelMoE marks its gradient tp-partial
        "expert_w13": lambda: [(parent, ExpertParallelMoE())],
        "expert_w2": lambda: [(parent, ExpertParallelMoE())],
    }[rule.layout]()


def plan_from_table(table) -> dict[str, Style]:
    """The plan that parallelizes a model whose parameters follow ``table``.

    One style per module (rules sharing a module, like the two expert tensors, give one), in
    table order, with the root's entry last: a tied output needs the already swapped embedding.
    """
    plan: dict[str, Style] = {}
    for rule in table:
        for module, style in styles_for_rule(rule):
            plan.setdefault(module, style)
    if "" in plan:
        plan[""] = plan.pop("")
    return plan

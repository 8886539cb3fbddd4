"""The distributed optimizer (ZeRO-1): AdamW states sharded over data parallelism.

``parallel.distributed_optimizer true``: the gradient buffers (``parallel.grad_buffer``) are
reduce-scattered, so after ``finish_grad_sync`` data-parallel rank r holds the summed gradients of
shard r of every bucket (dense buckets over ``dp``, expert buckets over ``edp``). Each rank keeps
AdamW states for its shards only and steps them; the buckets are then all-gathered so every
replica holds the whole updated parameters again.

Mixed precision (bf16/fp16 weights, ``training.runtime``): each rank owns an fp32 main copy of its
shard pieces only (cloned from the fp32 initial values before the weights are cast), steps it,
writes the result into its slice of the bf16 parameter buffer (``GradBuffer.cast_params``) and the
buckets are all-gathered in bf16. Memory per parameter: 2 (bf16 weight) + 4 (fp32 main grad) +
(4 main param + 8 Adam moments) / dp bytes, Megatron's 2 + 4 + 12/dp. With fp32 weights a shard's
main parameter is a view of the model parameter itself (``param.view(-1)[lo:hi]``): 4 + 4 + 8/dp.
A piece's gradient is always a view of the fp32 buffer. A shard piece keeps its parameter's
weight-decay rule (Megatron's: no decay for biases and 1-D parameters), and the inner optimizer is
the plain one's AdamW (``optimizer.make_adamw``), so the update of every element is the one the
plain optimizer makes; the LR scheduler drives it through ``param_groups``.

ZeRO-2/3 (``parallel.data_parallel_sharding``, ``parallel.zero``): a piece's gradient is a view of
its buffer's compact ``grad_shard`` instead, and under ZeRO-3 the step writes the updated shard
into the buffer's ``param_shard`` (the weights the executor gathers), with fp32 main copies even
under fp32 weights. The checkpoint format is this one whatever the stage.

Gradient clipping sees each rank's shards: ``main_norm_groups`` turns the trainer's norm groups
(tp/pp/ep rules of ``grad_norm_groups``) into groups of shard pieces whose squared sums are also
added over the group's dp (or edp) group, so every element of a reduced gradient counts once.

Checkpoints (``training.checkpoint``): the shard writer's ``model_optim_rng.pt`` holds only the
layout (``state_dict``); every rank writes its own shard (``sharded_state_dict``) as
``distrib_optim_dp{dp_rank:03d}.pt`` next to it, with the (parameter, flat range) of every
piece. The same layout loads each rank's own file; another data-parallel size or bucket size is
resharded: a rank reads every shard file holding its parameters and cuts out its new ranges.
The fp32 main parameters are not in the shard files: ``model_state_dict`` all-gathers them (fp32,
at save time only) into the shard writer's full model state, under the usual names, and
``load_main_state`` cuts each rank's pieces out of it again (rebuilt from the full model state), so
any dp size resumes and converters read fp32 main values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.grad_buffer import GradSync
from megatron_lite.pipeline.stages import TIED_EMBEDDING, model_chunks
from megatron_lite.training.optimizer import (
    MainParamOptimizer,
    NormGroup,
    build_optimizer,
    make_adamw,
    no_weight_decay,
    position_names,
)


@dataclass
class ShardPiece:
    """The part ``[lo, hi)`` (flattened) of one parameter that this rank's shards cover."""

    name: str
    param: nn.Parameter
    lo: int
    hi: int
    dp_group: str  # "dp_cp" or "edp"
    shard: nn.Parameter  # fp32 main values of param.view(-1)[lo:hi]; .grad is a view of the grad buffer
    where: tuple = ()  # (buffer, bucket, buffer offset): where ZeRO-3 keeps this piece's weights


class DistributedOptimizer:
    """AdamW over this rank's shards of a ``GradSync(shard=True)``, then an all-gather of the params.

    Args:
        grad_sync: the model's gradient buffers, built with ``shard=True``.
        opt_cfg: ``OptimizerConfig`` (betas, eps, weight decay; the lr is set by the scheduler).
        dims: the ``ParallelDims`` (the dp/edp groups of the clipping norm).
        mixed: the weights are about to be cast to a low precision: own fp32 copies of the shard
            pieces (taken now, from the fp32 values) instead of views of the parameters.
    """

    def __init__(self, grad_sync: GradSync, opt_cfg, dims, mixed: bool = False):
        if not grad_sync.shard:
            raise ValueError("DistributedOptimizer needs gradient buffers built with shard=True")
        self.grad_sync, self.dims, self.mixed = grad_sync, dims, mixed
        self.pieces = _shard_pieces(grad_sync, copy=mixed)
        self.main_params = [piece.shard for piece in self.pieces]
        decay = [p.shard for p in self.pieces if not no_weight_decay(p.name, p.param)]
        plain = [p.shard for p in self.pieces if no_weight_decay(p.name, p.param)]
        groups = [
            {"params": decay, "weight_decay": opt_cfg.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:  # every shard of this rank is padding: keep one (empty) group for the scheduler
            groups = [{"params": [nn.Parameter(torch.zeros(0))], "weight_decay": 0.0}]
        self.optimizer = make_adamw(groups, opt_cfg)

    @property
    def param_groups(self) -> list[dict]:
        """The inner AdamW's groups (the LR scheduler writes ``lr`` into them)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers (the ``.grad`` views stay attached whatever ``set_to_none``)."""
        self.grad_sync.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's shards, then all-gather every bucket's parameters over dp (edp)."""
        self.optimizer.step()
        self._write_weights()
        self.grad_sync.all_gather_params()

    @torch.no_grad()
    def _write_weights(self) -> None:
        """Cast the main shards into this rank's slice of the weights (ZeRO-3: its weight shard)."""
        if not (self.mixed and self.pieces):
            return
        params = []
        for p in self.pieces:
            kept = p.where[0].param_view(*p.where[1:], p.where[2] + p.hi - p.lo) if p.where else None
            params.append(kept if kept is not None else p.param.detach().view(-1)[p.lo : p.hi])
        torch._foreach_copy_(params, self.main_params)

    @torch.no_grad()
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()``, with the fp32 main values under mixed precision (all ranks call it).

        The main parameters are sharded, so each bucket's fp32 values are all-gathered over its dp
        group into a temporary buffer (checkpoint time only).
        """
        if self.grad_sync.stage >= 3:
            self.grad_sync.wait_param_gather()  # ZeRO-3: the full weights, before reading them
        state = model.state_dict()
        if not self.mixed:
            return state
        pieces = {(p.name, p.lo): p.shard for p in self.pieces}
        for name, value in gather_sharded_params(self.grad_sync, pieces, tag="main").items():
            if name in state:
                state[name] = value
        return state

    @torch.no_grad()
    def load_main_state(self, model_state: dict[str, torch.Tensor]) -> None:
        """Cut this rank's fp32 main pieces out of a full model state dict (no-op with fp32 weights)."""
        if not self.mixed:
            return
        for piece in self.pieces:
            piece.shard.copy_(model_state[piece.name].reshape(-1)[piece.lo : piece.hi])
        if self.grad_sync.stage >= 3:
            self._write_weights()  # the weight shards the executor gathers from

    def main_norm_groups(self, groups: list[NormGroup]) -> list[NormGroup]:
        """The trainer's norm groups over this rank's shard pieces, also summed over their dp group.

        A parameter left out of ``groups`` on this rank (a tp replica, the last stage's tied
        embedding copy) stays out; row weights (KV rows replicated over tp) become element weights.
        """
        by_param: dict[int, list[ShardPiece]] = {}
        for piece in self.pieces:
            by_param.setdefault(id(piece.param), []).append(piece)
        out = []
        for group in groups:
            reduce = _then(group.all_reduce, self.dims.group(group.dp_group))
            new = NormGroup(all_reduce=reduce, dp_group=group.dp_group)
            for param in group.params:
                for piece in by_param.get(id(param), []):
                    if piece.dp_group != group.dp_group:
                        raise ValueError(
                            f"{piece.name}: norm group over {group.dp_group!r} but sharded over "
                            f"{piece.dp_group!r}"
                        )
                    new.params.append(piece.shard)
                    if id(param) in group.row_weights:
                        per_row = param.numel() // param.shape[0]
                        weights = group.row_weights[id(param)].repeat_interleave(per_row)  # [numel]
                        new.row_weights[id(piece.shard)] = weights[piece.lo : piece.hi]
            out.append(new)
        return out

    # ------------------------------------------------------------------ checkpoints

    def layout(self) -> dict:
        """What a shard file depends on: each buffer's rule, dp size and bucket boundaries."""
        return {
            "buffers": [
                {
                    "groups": list(b.groups),
                    "dp_size": b.dp_size,
                    "buckets": [[k.start, k.end] for k in b.buckets],
                }
                for b in self.grad_sync.buffers
            ]
        }

    def state_dict(self) -> dict:
        """The part common to all dp ranks (the layout); the states are in ``sharded_state_dict``."""
        return {"distributed_optimizer": self.layout()}

    def load_state_dict(self, state: dict, model_state: dict | None = None) -> None:
        """Take a checkpoint's optimizer entry.

        A distributed-optimizer entry holds only the layout: the states come from the shard files
        after it, and ``same_layout`` says whether ``load_sharded_state_dict`` (same layout) or
        ``load_resharded`` must read them. A plain optimizer's full state (a run that switches
        ``parallel.distributed_optimizer`` on) is cut into this rank's pieces right here; its
        positions are named by ``model_state``, the checkpoint's model state dict.

        Raises:
            ValueError: a plain state without ``model_state``, or lacking a parameter of ours.
        """
        if isinstance(state, dict) and "distributed_optimizer" in state:
            self.saved_layout, self.needs_shard_files = state["distributed_optimizer"], True
            return
        if model_state is None:
            raise ValueError("a plain optimizer state can only be sharded with its model state dict")
        names = position_names(model_state)
        by_name = {names[i]: values for i, values in state["state"].items()}
        missing = [p.name for p in self.pieces if p.name not in by_name]
        if missing:
            raise ValueError(f"the plain optimizer state has no entry for {missing[0]}")
        self._load_cut(lambda piece: by_name[piece.name])
        self.needs_shard_files = False

    def _load_cut(self, states_of) -> None:
        """Give every piece the ``[lo, hi)`` slice of its parameter's flattened AdamW states.

        Args:
            states_of: piece -> ``{"step", "exp_avg", "exp_avg_sq"}`` of its whole (local) parameter.
        """
        params = [q for group in self.optimizer.param_groups for q in group["params"]]
        position = {id(q): i for i, q in enumerate(params)}
        merged = self.optimizer.state_dict()  # hyperparameters as they are; states filled in below
        for piece in self.pieces:
            merged["state"][position[id(piece.shard)]] = {
                key: t.clone() if key == "step" else t.reshape(-1)[piece.lo : piece.hi].clone()
                for key, t in states_of(piece).items()
            }
        self.optimizer.load_state_dict(merged)  # moves the states to the parameters' device

    def same_layout(self) -> bool:
        """Whether the loaded checkpoint's shards have this run's dp sizes and buckets."""
        return getattr(self, "saved_layout", None) == self.layout()

    def sharded_state_dict(self) -> dict:
        """This rank's AdamW states, with the (name, range, dp group) of every piece they belong to.

        ``piece_states`` holds the same tensors as ``optimizer`` (saved once), per piece, so
        another layout can cut them up again.
        """
        return {
            "layout": self.layout(),
            "pieces": [[p.name, p.lo, p.hi, p.dp_group] for p in self.pieces],
            "piece_states": [dict(self.optimizer.state.get(p.shard, {})) for p in self.pieces],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_sharded_state_dict(self, state: dict) -> None:
        """Restore ``sharded_state_dict`` (same layout and pieces, else ValueError)."""
        _check_layout(state["layout"], self.layout())
        pieces = [[p.name, p.lo, p.hi, p.dp_group] for p in self.pieces]
        if [list(p) for p in state["pieces"]] != pieces:
            raise ValueError("the optimizer shard covers other parameter ranges than this rank's shard")
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def load_resharded(self, sources: list[tuple[bool, bool, dict]]) -> None:
        """Rebuild this rank's AdamW states from shard files written with another dp/bucket layout.

        Args:
            sources: ``(dense_ok, expert_ok, sharded_state_dict)`` of every shard file that may
                hold this rank's parameters: ``dense_ok`` when the file's rank had this rank's
                dense (tp, pp) shards, ``expert_ok`` when it had this rank's experts.

        Raises:
            ValueError: a parameter range of this rank is in none of the files.
        """
        flat = assemble_piece_states(sources, {p.name: p.param.numel() for p in self.pieces})
        for piece in self.pieces:
            covered = flat.get(piece.name, {}).get("covered")
            if covered is None or not bool(covered[piece.lo : piece.hi].all()):
                raise ValueError(
                    f"no shard file holds the optimizer states of {piece.name}[{piece.lo}:{piece.hi}]"
                )
        self._load_cut(lambda piece: {k: t for k, t in flat[piece.name].items() if k != "covered"})


def assemble_piece_states(sources: list[tuple[bool, bool, dict]], numel: dict[str, int]) -> dict:
    """Flat per-parameter AdamW states from distributed-optimizer shard files.

    Args:
        sources: ``(dense_ok, expert_ok, sharded_state_dict)``: which of the file's pieces belong
            to the wanted shards (dense ones, expert ones).
        numel: wanted parameter name -> number of elements of its local shard.

    Returns:
        ``name -> {key: tensor}``: ``[numel]`` values for the moments, the step, and a boolean
        ``[numel]`` under key ``"covered"`` saying which elements some file held.
    """
    flat: dict[str, dict[str, torch.Tensor]] = {}
    for dense_ok, expert_ok, state in sources:
        for (name, lo, hi, dp_group), values in zip(state["pieces"], state["piece_states"]):
            if name not in numel or not (expert_ok if dp_group == "edp" else dense_ok):
                continue
            entry = flat.setdefault(name, {"covered": torch.zeros(numel[name], dtype=torch.bool)})
            for key, tensor in values.items():
                if key == "step":
                    entry[key] = tensor
                    continue
                entry.setdefault(key, torch.zeros(numel[name], dtype=tensor.dtype))[lo:hi] = tensor
            entry["covered"][lo:hi] = True
    return flat


def _shard_pieces(grad_sync: GradSync, copy: bool) -> list[ShardPiece]:
    """Every (parameter, flat range) inside this rank's shard of every bucket, in buffer order.

    ``copy``: the piece's main values are an fp32 clone, else a view sharing the parameter's storage.
    """
    pieces = []
    for buffer in grad_sync.buffers:
        for bucket in buffer.buckets:
            lo, hi = buffer.shard_range(bucket)
            for name, param, (start, end) in zip(bucket.names, bucket.params, bucket.ranges):
                a, b = max(lo, start), min(hi, end)
                if a >= b:
                    continue
                values = param.detach().view(-1)[a - start : b - start]  # [b - a]
                shard = nn.Parameter(values.float().clone() if copy else values)
                shard.grad = buffer.grad_view(bucket, a, b)  # [b - a], the reduced gradient lands here
                where = (buffer, bucket, a) if getattr(buffer, "stage", 1) >= 3 else ()
                pieces.append(ShardPiece(name, param, a - start, b - start, buffer.dp_name, shard, where))
    return pieces


@torch.no_grad()
def gather_sharded_params(grad_sync: GradSync, pieces: dict, tag: str) -> dict[str, torch.Tensor]:
    """Whole fp32 local parameters from dp-sharded pieces: one all-gather per bucket.

    Args:
        grad_sync: the gradient buffers whose bucket layout cut the pieces.
        pieces: this rank's fp32 values keyed ``(parameter name, offset in the parameter)``.
        tag: the communication log's label.

    Returns:
        Parameter name -> a new fp32 tensor of the parameter's shape (every rank gets all).
    """
    out = {}
    for buffer in grad_sync.buffers:
        numel = buffer.buckets[-1].end if buffer.buckets else 0  # the whole buffer, every dp shard
        full = torch.zeros(numel, dtype=torch.float32, device=buffer.data.device)  # [numel]
        for bucket in buffer.buckets:
            lo, hi = buffer.shard_range(bucket)
            for name, (start, end) in zip(bucket.names, bucket.ranges):
                a, b = max(lo, start), min(hi, end)
                if a < b:
                    full[a:b].copy_(pieces[(name, a - start)])
            if buffer.dp_size > 1:  # full[lo:hi] is this rank's part of the bucket
                comm.all_gather_single(full[bucket.start : bucket.end], full[lo:hi], buffer.dp_group, tag=tag)
            for name, param, (start, end) in zip(bucket.names, bucket.params, bucket.ranges):
                out[name] = full[start:end].view(param.shape).clone()
    return out


def _all_reduce(t: torch.Tensor, group) -> None:
    comm.all_reduce(t, group)  # squared gradient norms (fp32 scalars)


def _then(first, group):
    """``first`` (may be None), then a SUM all-reduce over ``group`` (skipped for one rank)."""
    size = dist.get_world_size(group) if group is not None else 1

    def all_reduce(t: torch.Tensor) -> None:
        if first is not None:
            first(t)
        if size > 1:
            _all_reduce(t, group)

    return all_reduce if first is not None or size > 1 else None


def _check_layout(saved: dict, current: dict) -> None:
    def sizes(layout):
        return {"+".join(b["groups"]): b["dp_size"] for b in layout["buffers"]}

    if sizes(saved) != sizes(current):
        raise ValueError(
            f"the distributed optimizer's shards were written with data-parallel sizes {sizes(saved)} "
            f"but this run has {sizes(current)}; resume with the same data-parallel layout"
        )
    if saved != current:
        count = lambda layout: [len(b["buckets"]) for b in layout["buffers"]]  # noqa: E731
        raise ValueError(
            f"the distributed optimizer's shards were written for another bucket layout ({count(saved)} "
            f"buckets per buffer, now {count(current)}): resume with the same parallel.grad_bucket_mb "
            "and model"
        )


def build_data_parallel(
    model: nn.Module, cfg, dims, precision: str = "fp32"
) -> tuple[GradSync | None, object]:
    """The gradient buffers (None when not needed) and the optimizer; casts the weights last.

    Args:
        model: the local model with its fp32 initial values.
        cfg: the run's config (``parallel`` data-parallel flags, ``optimizer``).
        dims: the ``ParallelDims``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (resolved, ``runtime.precision``).

    With fp32 and every data-parallel flag off this is the plain AdamW of ``build_optimizer`` and
    the trainer reduces gradients without buffers. bf16/fp16 always have buffers (the fp32 main
    gradients, even on one process); the optimizer copies the fp32 values into its main
    parameters before the weights are cast to the compute dtype.
    """
    from megatron_lite.parallel.zero import STAGES
    from megatron_lite.training.runtime import DTYPES

    par, mixed = cfg.parallel, precision != "fp32"
    stage = STAGES[par.data_parallel_sharding]
    if not (par.distributed_optimizer or par.overlap_grad_reduce or mixed):
        return None, build_optimizer(model, cfg.optimizer)
    own, chunk_of = (), None
    if dims.pp > 1:
        chunks = model_chunks(model, cfg, dims.local.pp)
        chunk_of = {id(p): c for c, chunk in enumerate(chunks) for p in chunk.parameters()}
        # Both stages must shard the tied embedding alike for its all-reduce after the reduce-scatter.
        own = {TIED_EMBEDDING} if cfg.model.tie_embeddings else ()
    grad_sync = GradSync(
        model,
        dims,
        par.grad_bucket_mb,
        overlap=par.overlap_grad_reduce,
        shard=par.distributed_optimizer,
        own_bucket=own,
        chunk_of=chunk_of,
        reduce_dtype=DTYPES[par.grad_reduce_dtype],
        overlap_param_gather=par.overlap_param_gather,
        stage=stage,
    )
    if (par.overlap_param_gather or stage >= 2) and not mixed:
        grad_sync.cast_params(torch.float32)  # fp32 parameter buffer; the shard views are taken after
    if par.distributed_optimizer:
        # ZeRO-3 keeps fp32 main copies even with fp32 weights: the weights themselves are gathered.
        optimizer = DistributedOptimizer(grad_sync, cfg.optimizer, dims, mixed=mixed or stage == 3)
    elif mixed:
        optimizer = MainParamOptimizer(model, cfg.optimizer)
    else:
        optimizer = build_optimizer(model, cfg.optimizer)
    if mixed:
        grad_sync.cast_params(DTYPES[precision])
    return grad_sync, optimizer

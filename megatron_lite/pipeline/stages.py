"""This rank's part of the model under pipeline parallelism: layers, chunks, tied embedding, checks.

One ``Transformer`` per rank holds every layer of all its virtual chunks under their global
names (``layers.{i}``), the embedding on pipeline rank 0, and the final norm and output layer on
the last pipeline rank (plus its own copy of the embedding when ``model.tie_embeddings``). So the
state dict, the optimizer, ``parallelize``, the init-by-name of ``materialize_local`` and the
checkpoints all see one ordinary module per rank, with the same names as the unpipelined model.

A :class:`ModelChunk` is a *view* of one virtual chunk of that module: it shares the modules and
runs only its layers, embedding in chunk 0 of rank 0 and applying the head in the last chunk of
the last rank. The executor drives the chunks.

Tied embeddings: the first and the last stage each hold ``tok_embeddings.weight``. Both start
equal (initialised by name) and :func:`allreduce_embedding_grads` sums their gradients over the
``embedding`` group (first and last rank of each pipeline, created by ``ParallelDims``) before
the optimizer step, so they stay equal. The gradient norm counts the first stage's copy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel import comm
from megatron_lite.pipeline.placement import is_first_stage, is_last_stage, layer_placement
from megatron_lite.pipeline.schedules import build_schedule

TIED_EMBEDDING = "tok_embeddings.weight"


def placement(cfg: Config) -> list[list[range]]:
    """``placement[pp_rank][chunk]``: global layers of every chunk (see ``layer_placement``)."""
    par = cfg.parallel
    return layer_placement(
        cfg.model.num_layers,
        par.pipeline,
        par.virtual_pipeline,
        par.num_layers_in_first_stage,
        par.num_layers_in_last_stage,
    )


def stage_layer_ids(cfg: Config, pp_rank: int) -> list[int]:
    """Global layer indices held by pipeline rank ``pp_rank`` (all its chunks), ascending."""
    return sorted(i for chunk in placement(cfg)[pp_rank] for i in chunk)


def stage_roles(pp_rank: int, pp: int) -> tuple[bool, bool]:
    """``(pre_process, post_process)`` of the rank's model: embedding on rank 0, head on the last."""
    return pp_rank == 0, pp_rank == pp - 1


def check_pipeline_config(cfg: Config, num_microbatches: int) -> None:
    """Layer split and schedule checks, before any process group exists.

    Args:
        cfg: validated config.
        num_microbatches: microbatches per rank per iteration.

    Raises:
        ConfigError: naming the fields and numbers (layers not divisible as requested, vpp > 1 with
            pp = 1, an unknown schedule, a schedule that cannot run this many microbatches).
    """
    par = cfg.parallel
    try:
        placement(cfg)
    except ValueError as exc:
        raise ConfigError(
            f"model.num_layers ({cfg.model.num_layers}) cannot be split over parallel.pipeline "
            f"({par.pipeline}) x parallel.virtual_pipeline ({par.virtual_pipeline}) with "
            f"parallel.num_layers_in_first_stage ({par.num_layers_in_first_stage}) and "
            f"parallel.num_layers_in_last_stage ({par.num_layers_in_last_stage}): {exc}"
        ) from None
    if par.pipeline == 1:
        return  # the schedule name is checked by ParallelConfig; there is nothing to schedule
    try:
        build_schedule(par.schedule, par.pipeline, par.virtual_pipeline, num_microbatches)
    except ValueError as exc:
        raise ConfigError(
            f"parallel.schedule {par.schedule!r} cannot run with parallel.pipeline ({par.pipeline}), "
            f"parallel.virtual_pipeline ({par.virtual_pipeline}) and {num_microbatches} microbatch(es) "
            f"per iteration (training.global_batch_size / (micro_batch_size * data-parallel size)): {exc}"
        ) from None


def activation_shape(cfg: Config, tp: int) -> tuple[int, int, int]:
    """Shape of the hidden states sent between stages: ``[b, s, h]``, ``[b, s/tp, h]`` under SP.

    ``s`` is this rank's part of the sequence under context parallelism (``seq_length / cp``).
    """
    seq = cfg.data.seq_length // cfg.parallel.context
    if cfg.parallel.sequence_parallel and tp > 1:
        seq //= tp
    return cfg.training.micro_batch_size, seq, cfg.model.hidden_size


@dataclass(frozen=True)
class ChunkSpec:
    """One virtual chunk of a pipeline rank: its layers and whether it embeds / applies the head."""

    layer_ids: range
    pre_process: bool
    post_process: bool


def chunk_specs(cfg: Config, pp_rank: int) -> list[ChunkSpec]:
    """The chunks of pipeline rank ``pp_rank``, in local chunk order."""
    pp, vpp = cfg.parallel.pipeline, cfg.parallel.virtual_pipeline
    return [
        ChunkSpec(layers, is_first_stage(pp_rank, c), is_last_stage(pp_rank, c, pp, vpp))
        for c, layers in enumerate(placement(cfg)[pp_rank])
    ]


class ModelChunk(nn.Module):
    """View of one virtual chunk of a rank's ``Transformer`` (modules shared, not copied).

    Its parameters are the chunk's layers, plus the embedding (first chunk of rank 0) and the
    final norm and output layer (last chunk of the last rank; with the tied embedding).

    Args:
        model: the rank's model (holds every layer of every local chunk).
        spec: which layers this chunk runs and whether it embeds / applies the head.
    """

    def __init__(self, model: nn.Module, spec: ChunkSpec):
        super().__init__()
        self.layer_keys = [str(i) for i in spec.layer_ids]
        self.layers = nn.ModuleDict({k: model.layers[k] for k in self.layer_keys})
        self.pre_process, self.post_process = spec.pre_process, spec.post_process
        if spec.pre_process or (spec.post_process and model.tok_embeddings is not None):
            self.tok_embeddings = model.tok_embeddings
        if spec.post_process:
            self.norm, self.output = model.norm, model.output
        self._root = (model,)  # a tuple, so the whole model is not registered as a submodule

    def forward(self, tokens_or_hidden, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """Token ids ``[b, s]`` (first chunk) or hidden ``[b, s(/tp), h]`` -> hidden, or logits (last)."""
        return self._root[0](
            tokens_or_hidden,
            position_ids,
            cu_seqlens,
            max_seqlen,
            layers=self.layer_keys,
            pre_process=self.pre_process,
            post_process=self.post_process,
        )

    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward modules of this chunk."""
        # pipeline/ does not import models/: MoE layers identify themselves.
        return [m for m in self.layers.modules() if getattr(m, "is_moe_layer", False)]


def model_chunks(model: nn.Module, cfg: Config, pp_rank: int) -> list[ModelChunk]:
    """One :class:`ModelChunk` per virtual chunk of ``pp_rank``, views of its ``model``."""
    return [ModelChunk(model, spec) for spec in chunk_specs(cfg, pp_rank)]


def is_tied_embedding_copy(model: nn.Module, name: str, pp: int) -> bool:
    """Whether ``name`` is the last stage's copy of the tied embedding (counted on the first stage)."""
    return (
        pp > 1
        and name == TIED_EMBEDDING
        and model.cfg.tie_embeddings
        and not getattr(model, "pre_process", True)
    )


@torch.no_grad()
def allreduce_embedding_grads(model: nn.Module, dims) -> None:
    """Sum the tied embedding's gradient over the first and last stage (no-op otherwise).

    Every rank may call it; only ranks of the first and last pipeline stage take part.
    """
    if dims.pp == 1 or not model.cfg.tie_embeddings or getattr(model, "tok_embeddings", None) is None:
        return
    weight = model.tok_embeddings.weight
    grad = getattr(weight, "main_grad", None)  # gradient buffers: the fp32 main grad
    if grad is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    comm.all_reduce(grad, dims.group("embedding"), tag="grad")

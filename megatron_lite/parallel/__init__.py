"""Rank grid, process groups, comm primitives, tensor/sequence/expert parallel layers, vocab-parallel loss.

Entry points::

    dims = ParallelDims.from_config(cfg.parallel, world_size)   # or validate_layout(...)
    dims.create_groups()
    parallelize(model, dims, cfg.parallel); materialize_local(model, dims, seed, device)
    loss = loss_fn(logits, labels, loss_mask, dims, vocab_size, num_tokens)
    loss.backward(); allreduce_gradients(model, dims)
"""

from megatron_lite.parallel.cross_entropy import loss_fn, vocab_parallel_cross_entropy
from megatron_lite.parallel.dims import ParallelDims, RankCoords, validate_layout
from megatron_lite.parallel.grads import allreduce_gradients, grad_reduce_groups
from megatron_lite.parallel.parallelize import load_full_state_dict, materialize_local, parallelize
from megatron_lite.parallel.sharding import (
    ShardSpec,
    padded_vocab_size,
    shard_spec_for,
    shard_tensor,
    unshard_tensors,
)

__all__ = [
    "ParallelDims",
    "RankCoords",
    "ShardSpec",
    "allreduce_gradients",
    "grad_reduce_groups",
    "load_full_state_dict",
    "loss_fn",
    "materialize_local",
    "padded_vocab_size",
    "parallelize",
    "shard_spec_for",
    "shard_tensor",
    "unshard_tensors",
    "validate_layout",
    "vocab_parallel_cross_entropy",
]

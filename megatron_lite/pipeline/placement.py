"""Placement of transformer layers on pipeline ranks and virtual chunks.

Megatron's looped ("interleaved") placement: the model is cut into ``pp * vpp`` contiguous
*virtual stages*. Local model chunk ``c`` on pipeline rank ``r`` is virtual stage ``c * pp + r``,
so the activations of one microbatch visit rank 0, 1, ..., pp-1, then rank 0 again for chunk 1,
and so on. With pp=4, vpp=2 and 16 layers, rank 0 holds layers 0-1 (chunk 0, stage 0) and
layers 8-9 (chunk 1, stage 4).

The embedding lives on virtual stage 0 (rank 0, chunk 0); the final norm and the output layer
live on the last virtual stage (rank pp-1, chunk vpp-1).

This module is the single owner of the (rank, chunk) <-> virtual stage mapping; the schedules
and the simulator import it rather than recomputing it.
"""

from __future__ import annotations


def _check_positive(**values: int | None) -> None:
    """Raise ValueError naming every field that is set but not a positive integer."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} ({value}) must be a positive integer")


def check_pipeline_dims(pp: int, vpp: int) -> None:
    """Validate the pipeline sizes shared by placement and schedules.

    Args:
        pp: Pipeline-parallel size (number of ranks in the pipeline).
        vpp: Virtual pipeline size (model chunks per rank).

    Raises:
        ValueError: If a size is not positive, or vpp > 1 with pp = 1 (consecutive virtual
            stages would sit on the same rank, so there is nothing to interleave).
    """
    _check_positive(pipeline_parallel=pp, virtual_pipeline_parallel=vpp)
    if vpp > 1 and pp == 1:
        raise ValueError(
            f"virtual_pipeline_parallel ({vpp}) > 1 needs pipeline_parallel > 1 (got {pp}): "
            "virtual stages only help when they alternate between ranks"
        )


def num_virtual_stages(pp: int, vpp: int) -> int:
    """Total number of virtual stages (model chunks over all ranks)."""
    return pp * vpp


def virtual_stage(rank: int, chunk: int, pp: int) -> int:
    """Virtual stage index held by local ``chunk`` of pipeline ``rank`` (round-robin looping)."""
    return chunk * pp + rank


def stage_location(stage: int, pp: int) -> tuple[int, int]:
    """Inverse of :func:`virtual_stage`: ``(rank, chunk)`` holding virtual ``stage``."""
    return stage % pp, stage // pp


def is_first_stage(rank: int, chunk: int) -> bool:
    """True for the virtual stage that owns the embedding (rank 0, chunk 0)."""
    return rank == 0 and chunk == 0


def is_last_stage(rank: int, chunk: int, pp: int, vpp: int) -> bool:
    """True for the virtual stage that owns the final norm and output layer."""
    return rank == pp - 1 and chunk == vpp - 1


def _stage_layer_counts(num_layers: int, stages: int, first: int | None, last: int | None) -> list[int]:
    """Number of layers per virtual stage, first/last overridden, the rest split evenly."""
    if stages == 1:
        for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
            if value is not None and value != num_layers:
                raise ValueError(f"{name} ({value}) must equal num_layers ({num_layers}) with a single stage")
        return [num_layers]
    fixed = [v for v in (first, last) if v is not None]
    middle_stages = stages - len(fixed)
    middle_layers = num_layers - sum(fixed)
    overrides = f"first_stage_layers ({first}), last_stage_layers ({last})"
    if middle_layers < middle_stages or (middle_stages == 0 and middle_layers != 0):
        raise ValueError(
            f"num_layers ({num_layers}) with {overrides} leaves {middle_layers} layers for "
            f"{middle_stages} remaining virtual stages; every stage needs at least one layer"
        )
    if middle_stages and middle_layers % middle_stages:
        raise ValueError(
            f"num_layers ({num_layers}) minus {overrides} = {middle_layers} layers is not "
            f"divisible by the {middle_stages} remaining virtual stages "
            "(pipeline_parallel * virtual_pipeline_parallel minus the uneven ones)"
        )
    per_stage = middle_layers // middle_stages if middle_stages else 0
    counts = [per_stage] * stages
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def layer_placement(
    num_layers: int,
    pp: int,
    vpp: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[list[range]]:
    """Global layer indices held by every (rank, chunk).

    Args:
        num_layers: Number of transformer layers in the model.
        pp: Pipeline-parallel size.
        vpp: Model chunks per rank (virtual pipeline size).
        first_stage_layers: Layers on virtual stage 0 (which also holds the embedding), or None
            for an even split.
        last_stage_layers: Layers on the last virtual stage (which also holds the final norm and
            output layer), or None for an even split.

    Returns:
        ``placement[rank][chunk]`` is the contiguous range of global layer indices of that chunk.

    Raises:
        ValueError: For non-positive values, vpp > 1 with pp = 1, or layer counts that cannot be
            split as requested; the message names the fields and numbers.

    Example:
        >>> layer_placement(16, 4, 2)[0]
        [range(0, 2), range(8, 10)]
    """
    _check_positive(
        num_layers=num_layers, first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers
    )
    check_pipeline_dims(pp, vpp)
    stages = num_virtual_stages(pp, vpp)
    counts = _stage_layer_counts(num_layers, stages, first_stage_layers, last_stage_layers)
    starts = [sum(counts[:s]) for s in range(stages)]
    return [
        [
            range(starts[s], starts[s] + counts[s])
            for s in (virtual_stage(rank, chunk, pp) for chunk in range(vpp))
        ]
        for rank in range(pp)
    ]

"""Pipeline schedules as data (DESIGN principle 5).

A schedule is ``list[list[Action]]``: for every pipeline rank, the ordered actions it performs
in one training step (see ``actions.py``). The generators below only decide the order of the
*compute* actions; :func:`~megatron_lite.pipeline.communication.add_communication` derives
every send and receive from that order, once for all schedules, and documents the rule the
executor must follow to post them. The executor walks the lists; the simulator reads the very
same lists.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_lite.pipeline.actions import Action, B, F, Schedule
from megatron_lite.pipeline.communication import add_communication
from megatron_lite.pipeline.placement import check_pipeline_dims

__all__ = [
    "SCHEDULES",
    "SCHEDULE_OPTIONS",
    "Action",
    "Schedule",
    "breadth_first",
    "build_schedule",
    "check_interleaved",
    "forward_only",
    "gpipe",
    "ideal_bubble_fraction",
    "interleaved_1f1b",
    "one_f_one_b",
]


# --------------------------------------------------------------------------- compute orders


def _gpipe_compute(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """All forwards, then all backwards in the same microbatch order."""
    order = [F(0, m) for m in range(num_microbatches)] + [B(0, m) for m in range(num_microbatches)]
    return [list(order) for _ in range(pp)]


def _one_f_one_b_compute(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B: warmup forwards, alternating steady state, backward cooldown."""
    out = []
    for rank in range(pp):
        warmup = min(pp - rank - 1, num_microbatches)
        order = [F(0, m) for m in range(warmup)]
        for m in range(num_microbatches - warmup):
            order += [F(0, m + warmup), B(0, m)]
        order += [B(0, m) for m in range(num_microbatches - warmup, num_microbatches)]
        out.append(order)
    return out


def _microbatch_table(num_microbatches: int, vpp: int, group: int) -> list[tuple[int, int]]:
    """Forward visiting order (microbatch, chunk) on every rank of the interleaved schedule.

    Microbatches are taken in groups of ``group``; each chunk runs the whole group before the
    next chunk starts. The last group holds the remainder (Megatron's ``get_schedule_table``).
    """
    table: list[tuple[int, int]] = []
    for start in range(0, num_microbatches, group):
        end = min(start + group, num_microbatches)
        table += [(m, c) for c in range(vpp) for m in range(start, end)]
    return table


def check_interleaved(pp: int, vpp: int, num_microbatches: int, group: int) -> None:
    """Megatron-LM core's constraints on the interleaved schedule (schedules.py, main, 2026).

    Megatron requires ``pp <= microbatch_group_size_per_vp_stage <= num_microbatches`` (default
    group size = pp) and that the remainder ``num_microbatches % group`` is 0 or >= pp. With the
    default group this means num_microbatches must be a multiple of pp.
    """
    if not pp <= group <= num_microbatches:
        raise ValueError(
            f"interleaved schedule: microbatch_group_size ({group}) must be in "
            f"[pipeline_parallel ({pp}), num_microbatches ({num_microbatches})]; with the default "
            f"group size (= pipeline_parallel) num_microbatches must be a multiple of {pp}"
        )
    tail = num_microbatches % group
    if 0 < tail < pp:
        raise ValueError(
            f"interleaved schedule: num_microbatches ({num_microbatches}) % microbatch_group_size "
            f"({group}; default pipeline_parallel) = {tail} must be 0 or >= pipeline_parallel "
            f"({pp}) (Megatron-LM's rule; a short tail group stalls the pipeline); use a multiple "
            f"of {group} microbatches"
        )


def _interleaved_compute(pp: int, vpp: int, num_microbatches: int, group: int) -> Schedule:
    """Megatron's interleaved 1F1B over virtual stages (depth-first when group == pp)."""
    table = _microbatch_table(num_microbatches, vpp, group)
    fwd = [F(c, m) for m, c in table]
    # Backward visits chunks in reverse: the last virtual stage's gradient is available first.
    bwd = [B(vpp - 1 - c, m) for m, c in table]
    total = len(table)
    out = []
    for rank in range(pp):
        # Earlier ranks run more warmup forwards; every rank first fills all but one chunk of
        # the first group. The factor 2 covers the forward and the backward pipeline fill.
        warmup = min(total, 2 * (pp - rank - 1) + (vpp - 1) * group)
        order = fwd[:warmup]
        for k in range(total - warmup):
            order += [fwd[warmup + k], bwd[k]]
        order += bwd[total - warmup :]
        out.append(order)
    return out


def _breadth_first_compute(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """Looped breadth-first (Lamy-Poirier 2022): chunk by chunk, all microbatches each.

    Forwards: chunk 0 on every microbatch, then chunk 1, ... Backwards: chunk vpp-1 on every
    microbatch, then vpp-2, ... so the gradients of the last chunk are final early and its
    data-parallel reduction can overlap the remaining backwards.
    """
    order = [F(c, m) for c in range(vpp) for m in range(num_microbatches)]
    order += [B(c, m) for c in reversed(range(vpp)) for m in range(num_microbatches)]
    return [list(order) for _ in range(pp)]


# --------------------------------------------------------------------------- public API


def _check_common(name: str, pp: int, vpp: int, num_microbatches: int, needs_vpp1: bool) -> None:
    check_pipeline_dims(pp, vpp)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be a positive integer")
    if needs_vpp1 and vpp != 1:
        raise ValueError(
            f"schedule {name!r} has one model chunk per rank but virtual_pipeline_parallel is {vpp}; "
            "use 'interleaved' or 'breadth-first' for vpp > 1"
        )


def gpipe(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards. Needs vpp == 1."""
    _check_common("gpipe", pp, vpp, num_microbatches, needs_vpp1=True)
    return add_communication(_gpipe_compute(pp, vpp, num_microbatches), vpp)


def one_f_one_b(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """1F1B: ``pp - rank - 1`` warmup forwards, steady one-forward-one-backward, cooldown."""
    _check_common("1f1b", pp, vpp, num_microbatches, needs_vpp1=True)
    return add_communication(_one_f_one_b_compute(pp, vpp, num_microbatches), vpp)


def interleaved_1f1b(
    pp: int, vpp: int, num_microbatches: int, microbatch_group_size: int | None = None
) -> Schedule:
    """Megatron's interleaved 1F1B (depth-first over virtual stages).

    With vpp == 1 this is plain :func:`one_f_one_b`, as in Megatron-LM.

    Args:
        pp: Pipeline-parallel size.
        vpp: Model chunks per rank.
        num_microbatches: Microbatches per step; see :func:`check_interleaved` for the rules.
        microbatch_group_size: Microbatches one chunk runs before the next chunk
            (Megatron's ``microbatch_group_size_per_vp_stage``); default pp.
    """
    _check_common("interleaved", pp, vpp, num_microbatches, needs_vpp1=False)
    if vpp == 1:
        return one_f_one_b(pp, vpp, num_microbatches)
    group = pp if microbatch_group_size is None else microbatch_group_size
    check_interleaved(pp, vpp, num_microbatches, group)
    return add_communication(_interleaved_compute(pp, vpp, num_microbatches, group), vpp)


def breadth_first(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """Breadth-first looped schedule; any num_microbatches (bubble-optimal when >= pp).

    Memory: every rank holds all ``vpp * num_microbatches`` activations at the turn from
    forward to backward, like GPipe. With vpp == 1 this is GPipe.
    """
    _check_common("breadth-first", pp, vpp, num_microbatches, needs_vpp1=False)
    return add_communication(_breadth_first_compute(pp, vpp, num_microbatches), vpp)


def forward_only(pp: int, vpp: int, num_microbatches: int) -> Schedule:
    """Forwards only (evaluation): chunk by chunk, all microbatches each, as breadth-first.

    Not a training schedule (no backward, so not in :data:`SCHEDULES`); its sends and receives
    are placed and checked like every other schedule's, so the executor walks it the same way.
    """
    check_pipeline_dims(pp, vpp)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be a positive integer")
    order = [F(c, m) for c in range(vpp) for m in range(num_microbatches)]
    return add_communication([list(order) for _ in range(pp)], vpp)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
    "breadth-first": breadth_first,
}
# Keyword options each schedule accepts beyond (pp, vpp, num_microbatches).
SCHEDULE_OPTIONS: dict[str, tuple[str, ...]] = {"interleaved": ("microbatch_group_size",)}


def build_schedule(name: str, pp: int, vpp: int, num_microbatches: int, **options: int) -> Schedule:
    """Build a registered schedule by name after validating its arguments.

    Args:
        name: One of :data:`SCHEDULES`.
        pp: Pipeline-parallel size.
        vpp: Model chunks per rank.
        num_microbatches: Microbatches per step.
        **options: Schedule-specific keywords (e.g. ``microbatch_group_size`` for interleaved).

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or invalid sizes.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    unknown = sorted(set(options) - set(SCHEDULE_OPTIONS.get(name, ())))
    if unknown:
        raise ValueError(
            f"schedule {name!r} does not take {', '.join(unknown)}; "
            f"its options: {', '.join(SCHEDULE_OPTIONS.get(name, ())) or 'none'}"
        )
    return SCHEDULES[name](pp, vpp, num_microbatches, **options)


def ideal_bubble_fraction(name: str, pp: int, vpp: int, num_microbatches: int) -> float | None:
    """Closed-form bubble fraction of a schedule with free communication.

    ``(P-1)/(M+P-1)`` for GPipe and 1F1B; ``(P-1)/(V*M+P-1)`` for interleaved and breadth-first
    (looped: every chunk is ``1/V`` of a stage, so the fill and drain shrink ``V`` times). The
    simulator reproduces these exactly in "async" mode with ``t_comm = 0`` for every ratio of
    forward to backward time tried (1:10 to 10:1). Breadth-first only reaches it with at least
    ``pp`` microbatches (with fewer, rank 0 waits for its own microbatch to come back around);
    None there.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    looped = name in ("interleaved", "breadth-first")
    if name == "breadth-first" and vpp > 1 and num_microbatches < pp:
        return None
    v = vpp if looped else 1
    return (pp - 1) / (v * num_microbatches + pp - 1)

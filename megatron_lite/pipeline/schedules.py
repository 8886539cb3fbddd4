"""Pipeline schedules as data (DESIGN principle 5).

A schedule is ``list[list[Action]]``: for every pipeline rank, the ordered actions it performs
in one training step. The generators below only decide the order of *compute* actions
(forward ``F`` / backward ``B`` of local chunk ``c`` on microbatch ``m``); one shared function,
:func:`add_communication`, derives every send and receive from that order. The executor walks
the lists; the simulator reads the very same lists.

Communication rule (what the executor must do)
----------------------------------------------
* ``RECV_*`` for a compute action is placed immediately before it, ``SEND_*`` of its output
  immediately after it. Hence between two compute actions there is at most one send (output of
  the previous one) and one receive (input of the next one).
* The executor posts every maximal run of consecutive comm actions as ONE batched
  ``batch_isend_irecv`` call and waits for all of its requests before the next compute action.
  Posting the send of step i together with the receive of step i+1 is what lets two
  neighbours that send to each other at the same time (forward one way, gradient the other
  way) both make progress; posting them as two separate blocking batches can deadlock.
* On every directed pair of ranks, the k-th send of the sender matches the k-th receive of the
  receiver (NCCL matches point-to-point messages in posting order and ignores tags; forward
  activations and gradients have the same shape, so a mismatch would silently mix them up).
  :func:`add_communication` checks this pairing and raises if a compute order breaks it.
* The simulator models the pessimistic (rendezvous) case: a batch completes only when the
  peer of every send has posted the matching receive. All generated schedules are tested to be
  deadlock-free under it.

Send/recv actions carry the *local* chunk and microbatch of the compute action they belong to
(the producer for a send, the consumer for a receive) plus the ``peer`` rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_lite.pipeline.placement import (
    check_pipeline_dims,
    is_first_stage,
    is_last_stage,
    stage_location,
    virtual_stage,
)

COMPUTE_KINDS = ("F", "B")
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
Schedule = list[list["Action"]]


@dataclass(frozen=True)
class Action:
    """One step of one pipeline rank.

    Attributes:
        kind: "F", "B" (compute) or "SEND_F", "RECV_F", "SEND_B", "RECV_B" (communication).
            ``*_F`` moves a forward activation, ``*_B`` moves an activation gradient.
        chunk: Local model chunk index (0 <= chunk < vpp) of the compute action concerned.
        microbatch: Microbatch index.
        peer: Rank on the other end of a send/recv; None for compute actions.
    """

    kind: str
    chunk: int
    microbatch: int
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPUTE_KINDS + COMM_KINDS:
            raise ValueError(f"Action kind {self.kind!r} is not one of {COMPUTE_KINDS + COMM_KINDS}")
        if self.is_comm != (self.peer is not None):
            raise ValueError(f"Action {self.kind} needs peer set iff it is a send/recv (peer={self.peer})")

    @property
    def is_comm(self) -> bool:
        """True for send/recv actions."""
        return self.kind in COMM_KINDS

    @property
    def is_send(self) -> bool:
        """True for SEND_F / SEND_B."""
        return self.kind.startswith("SEND")

    def __str__(self) -> str:
        peer = f"{'->' if self.is_send else '<-'}{self.peer}" if self.is_comm else ""
        return f"{self.kind}(c{self.chunk},m{self.microbatch}{peer})"


def F(chunk: int, microbatch: int) -> Action:
    """Forward of local ``chunk`` on ``microbatch``."""
    return Action("F", chunk, microbatch)


def B(chunk: int, microbatch: int) -> Action:
    """Backward of local ``chunk`` on ``microbatch``."""
    return Action("B", chunk, microbatch)


# --------------------------------------------------------------------------- communication


def _comm_for(action: Action, rank: int, pp: int, vpp: int) -> tuple[Action | None, Action | None]:
    """The (receive before, send after) a compute action, from the virtual-stage neighbours."""
    stage = virtual_stage(rank, action.chunk, pp)
    first, last = is_first_stage(rank, action.chunk), is_last_stage(rank, action.chunk, pp, vpp)
    m = action.microbatch
    if action.kind == "F":
        # Forward input comes from the previous virtual stage, output goes to the next one.
        recv_src = None if first else stage_location(stage - 1, pp)[0]
        send_dst = None if last else stage_location(stage + 1, pp)[0]
        kinds = ("RECV_F", "SEND_F")
    else:
        # The loss gradient is produced locally on the last stage; the first stage's input
        # gradient (w.r.t. the embedding output) stays local.
        recv_src = None if last else stage_location(stage + 1, pp)[0]
        send_dst = None if first else stage_location(stage - 1, pp)[0]
        kinds = ("RECV_B", "SEND_B")
    recv = None if recv_src is None else Action(kinds[0], action.chunk, m, recv_src)
    send = None if send_dst is None else Action(kinds[1], action.chunk, m, send_dst)
    return recv, send


def message_key(action: Action, rank: int, pp: int) -> tuple[str, int, int]:
    """Identity of the tensor a send/recv carries: (kind, producing virtual stage, microbatch).

    A send and a receive match iff their keys are equal.
    """
    stage = virtual_stage(rank, action.chunk, pp)
    if action.is_send:
        return action.kind[-1], stage, action.microbatch
    producer = stage - 1 if action.kind == "RECV_F" else stage + 1
    return action.kind[-1], producer, action.microbatch


def check_pairing(schedule: Schedule) -> None:
    """Check that every directed channel's sends and receives match one-to-one, in order.

    Raises:
        ValueError: Naming the channel and the first unmatched or out-of-order message.
    """
    pp = len(schedule)
    sends: dict[tuple[int, int], list[tuple]] = {}
    recvs: dict[tuple[int, int], list[tuple]] = {}
    for rank, actions in enumerate(schedule):
        for a in actions:
            if a.is_comm:
                chan = (rank, a.peer) if a.is_send else (a.peer, rank)
                table = sends if a.is_send else recvs
                table.setdefault(chan, []).append((message_key(a, rank, pp), rank, a))
    for chan in sorted(set(sends) | set(recvs)):
        s_list, r_list = sends.get(chan, []), recvs.get(chan, [])
        for k in range(max(len(s_list), len(r_list))):
            s = s_list[k] if k < len(s_list) else None
            r = r_list[k] if k < len(r_list) else None
            if s is None or r is None or s[0] != r[0]:
                what = f"send {s[2]} of rank {s[1]}" if s else "no send"
                got = f"receive {r[2]} of rank {r[1]}" if r else "no receive"
                raise ValueError(
                    f"channel rank {chan[0]} -> rank {chan[1]}: message #{k} is {what} but {got}; "
                    "sends and receives on a channel must match one-to-one in order"
                )


def add_communication(compute: Schedule, vpp: int) -> Schedule:
    """Insert SEND/RECV actions around the compute actions of every rank.

    This is the single place where communication is derived; see the module docstring for the
    posting rule it guarantees.

    Args:
        compute: Per-rank compute-only action lists.
        vpp: Model chunks per rank.

    Returns:
        Per-rank action lists including communication.
    """
    pp = len(compute)
    out: Schedule = []
    for rank, actions in enumerate(compute):
        seq: list[Action] = []
        for a in actions:
            recv, send = _comm_for(a, rank, pp, vpp)
            seq.extend(x for x in (recv, a, send) if x is not None)
        out.append(seq)
    check_pairing(out)
    return out


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
    """Megatron-LM core's constraints on the interleaved schedule (as of 2025).

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
            f"({group}) = {tail} must be 0 or >= pipeline_parallel ({pp}) (Megatron-LM's rule; a "
            f"short tail group stalls the pipeline); use a multiple of {group} microbatches"
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
    """Breadth-first looped schedule; any num_microbatches (bubble-optimal when >= pp)."""
    _check_common("breadth-first", pp, vpp, num_microbatches, needs_vpp1=False)
    return add_communication(_breadth_first_compute(pp, vpp, num_microbatches), vpp)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
    "breadth-first": breadth_first,
}


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
    return SCHEDULES[name](pp, vpp, num_microbatches, **options)

"""Pipeline actions: the vocabulary of schedules, and how sends/receives pair up.

A schedule is ``list[list[Action]]``: for every pipeline rank, the ordered actions it performs
in one training step. Compute actions are forward ``F`` / backward ``B`` of local chunk ``c``
on microbatch ``m``. Send/receive actions carry the *local* chunk and microbatch of the compute
action they belong to (the producer for a send, the consumer for a receive) plus the ``peer``
rank; :func:`message_key` turns either side into the identity of the tensor moved, so a send
and a receive match iff their keys are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.pipeline.placement import (
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
        if self.chunk < 0 or self.microbatch < 0:
            raise ValueError(f"Action chunk ({self.chunk}) and microbatch ({self.microbatch}) must be >= 0")
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


def comm_for(action: Action, rank: int, pp: int, vpp: int) -> tuple[Action | None, Action | None]:
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


def adjacent_communication(compute: Schedule, vpp: int) -> Schedule:
    """Each receive right before its consumer, each send right after its producer.

    This is the naive placement; it is data-correct but can deadlock under blocking
    point-to-point (see ``communication.add_communication`` for the placement schedules use).
    """
    pp = len(compute)
    out: Schedule = []
    for rank, actions in enumerate(compute):
        seq: list[Action] = []
        for a in actions:
            recv, send = comm_for(a, rank, pp, vpp)
            seq.extend(x for x in (recv, a, send) if x is not None)
        out.append(seq)
    return out

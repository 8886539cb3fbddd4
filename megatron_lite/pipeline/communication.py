"""Derive every send and receive of a schedule from its compute order.

This is the one place where communication is placed; every schedule generator calls
:func:`add_communication` on its per-rank compute order.

Posting rule (what the executor must do)
----------------------------------------
1. Walk the rank's action list in order. Every maximal run of consecutive SEND/RECV actions
   is ONE batch: post it with a single ``dist.batch_isend_irecv`` call, ops in list order.
2. Before a compute action, wait for the requests of the receives that feed it. Waiting for
   the whole batch right after posting it (sends included) is also safe: every generated
   schedule is checked deadlock-free under that strictest executor (simulator mode
   "rendezvous"); waiting only for receives gives the ideal timeline (mode "async").
3. Keep each sent tensor alive until its request completes; wait for all outstanding send
   requests before the step ends.
4. On each directed pair of ranks the k-th send of the sender matches the k-th receive of the
   receiver: NCCL matches point-to-point messages in posting order and ignores tags, and an
   activation and a gradient have the same shape, so a mismatch would silently mix them up.
   Posting in list order satisfies it; :func:`~megatron_lite.pipeline.actions.check_pairing`
   verifies that the lists are consistent (done for every schedule built here).
5. (torch) The first ``batch_isend_irecv`` on a group must involve all of its ranks; run a
   collective on the pipeline group (e.g. a barrier) before the first step.

Placement
---------
Each message is exchanged at the earliest instant, on a dependency-only ("eager") timeline of
the compute order, at which its sender (after producing it) and its receiver (before consuming
it) are both between two compute actions. The SEND goes into the sender's batch there and the
RECV into the receiver's, so a send may be deferred, and a receive posted (prefetched, as
Megatron does) a few compute actions early. When the two are never idle at the same time, the
send goes right after its producer and the receive into the receiver's first gap after it.

Why: with blocking point-to-point a send completes only once the peer has posted the matching
receive. Receiving just before use makes, for example, the last rank of a looped schedule wait
on its send to rank 0 while rank 0 is still busy with its other microbatches and itself waiting
on rank 1: a cycle. Meeting where both are free avoids such cycles and, for GPipe, 1F1B and
breadth-first, even keeps the ideal timeline under blocking sends. Every schedule built here is
simulated under blocking sends before it is returned, so a deadlock is an error at build time,
never a hang in training. Deadlock freedom depends on the order alone, not on the real times;
the eager timeline uses per-chunk times forward 1, backward 2 (the usual ratio).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from megatron_lite.pipeline.actions import (
    Action,
    Schedule,
    adjacent_communication,
    comm_for,
    message_key,
)
from megatron_lite.pipeline.simulator import simulate

# Per-chunk times of the eager timeline used for placement; integers keep the times exact.
_PLACEMENT_T_FWD = 1
_PLACEMENT_T_BWD = 2


@dataclass
class _Gaps:
    """Time span of every gap around a rank's compute actions on the eager timeline.

    Gap ``g`` lies just before compute action ``g`` (gap ``n`` after the last one); it spans
    ``[lo[g], hi[g]]``, from the end of action ``g - 1`` to the start of action ``g``
    (zero-length while the rank is busy).
    """

    lo: list[float]
    hi: list[float]

    @classmethod
    def of(cls, timeline: list) -> _Gaps:
        return cls([0.0] + [iv.end for iv in timeline], [iv.start for iv in timeline] + [math.inf])


def _meet(send: _Gaps, first_send: int, recv: _Gaps, last_recv: int) -> tuple[int, int, float]:
    """Earliest instant at which sender and receiver both sit in a gap.

    The sender may use gaps ``first_send..`` (after producing the tensor), the receiver gaps
    ``..last_recv`` (before consuming it). Returns (sender gap, receiver gap, time). Falls back
    to the producer's gap and the receiver's first gap after the send (the sender then waits
    for the receiver to finish one compute action) when the two never idle together.
    """
    t_send = send.lo[first_send]
    first_recv = bisect.bisect_left(recv.hi, t_send, 0, last_recv + 1)
    i, j = first_send, first_recv
    while i < len(send.lo) and j <= last_recv:
        if max(send.lo[i], recv.lo[j]) <= min(send.hi[i], recv.hi[j]):
            return i, j, max(send.lo[i], recv.lo[j])
        # Interval-intersection merge: drop whichever gap closes first.
        if send.hi[i] < recv.hi[j]:
            i += 1
        else:
            j += 1
    return first_send, first_recv, max(t_send, recv.lo[first_recv])


def _place(compute: Schedule, vpp: int) -> list[list[list[tuple[float, float, Action]]]]:
    """Comm actions to post in every gap of every rank, with sort keys (meet time, send time)."""
    pp = len(compute)
    timing = simulate(
        adjacent_communication(compute, vpp),
        t_fwd=_PLACEMENT_T_FWD * vpp,
        t_bwd=_PLACEMENT_T_BWD * vpp,
        vpp=vpp,
        check_order=False,
    )
    gaps = [_Gaps.of(tl) for tl in timing.timelines]
    # Where every message is produced: key -> (rank, producer index, send action).
    producers = {}
    for rank, actions in enumerate(compute):
        for i, a in enumerate(actions):
            send = comm_for(a, rank, pp, vpp)[1]
            if send is not None:
                producers[message_key(send, rank, pp)] = (rank, i, send)
    posts: list[list[list]] = [[[] for _ in range(len(actions) + 1)] for actions in compute]
    for rank, actions in enumerate(compute):
        for j, a in enumerate(actions):
            recv = comm_for(a, rank, pp, vpp)[0]
            if recv is None:
                continue
            src, i, send = producers[message_key(recv, rank, pp)]
            g_send, g_recv, t_meet = _meet(gaps[src], i + 1, gaps[rank], j)
            t_send = gaps[src].lo[i + 1]
            posts[src][g_send].append((t_meet, t_send, send))
            posts[rank][g_recv].append((t_meet, t_send, recv))
    return posts


def add_communication(compute: Schedule, vpp: int) -> Schedule:
    """Insert SEND/RECV actions into per-rank compute orders.

    Args:
        compute: Per-rank compute-only action lists (``F``/``B``).
        vpp: Model chunks per rank.

    Returns:
        Per-rank action lists including communication, following the posting rule of this
        module.

    Raises:
        ScheduleError: If the compute order is inconsistent (e.g. a backward before its forward).
        PipelineDeadlock: If the compute order cannot complete, or (a bug) the placement would
            deadlock an executor that waits for whole batches.
    """
    pp = len(compute)
    if pp == 1:
        return [list(actions) for actions in compute]
    posts = _place(compute, vpp)
    out: Schedule = []
    for rank, actions in enumerate(compute):
        seq: list[Action] = []
        for g, a in enumerate([*actions, None]):
            # Same order on both ends of every channel: by meeting time, then production time.
            seq.extend(comm for *_, comm in sorted(posts[rank][g], key=lambda p: p[:2]))
            if a is not None:
                seq.append(a)
        out.append(seq)
    # Guarantee for the executor: channels pair up in order, and no deadlock even if it waits
    # for every batch, sends included.
    simulate(out, vpp=vpp, mode="rendezvous")
    return out

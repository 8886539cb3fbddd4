"""Event-driven simulator for pipeline schedules.

It reads the same per-rank action lists the executor walks (see ``schedules.py``) and models
the executor's behaviour:

* compute actions take ``t_fwd / vpp`` or ``t_bwd / vpp`` (the given times are for a whole
  stage, i.e. all of a rank's layers; one of ``vpp`` chunks holds ``1/vpp`` of them);
* a maximal run of consecutive comm actions is posted as one batch and the rank waits until
  every message of the batch has been transferred. Sends are *rendezvous*: a message moves only
  once both its send and its receive have been posted, and takes ``t_comm``. That is the
  pessimistic model of NCCL point-to-point, so a schedule that does not deadlock here does not
  deadlock on the executor either.

It checks that every receive has its matching send (per directed channel, in order), that
every compute action has its inputs (a forward its activation, a backward its forward and its
output gradient), and reports a deadlock with the blocked ranks and actions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_lite.pipeline.placement import virtual_stage
from megatron_lite.pipeline.schedules import Action, Schedule, check_pairing, message_key


class ScheduleError(ValueError):
    """The action lists are inconsistent (missing input, duplicate compute, unpaired comm)."""


class PipelineDeadlock(RuntimeError):
    """No rank can progress.

    Attributes:
        blocked: For every unfinished rank, the actions it is waiting on.
    """

    def __init__(self, blocked: dict[int, list[Action]]) -> None:
        self.blocked = blocked
        parts = [f"rank {r} blocked on {', '.join(str(a) for a in acts)}" for r, acts in blocked.items()]
        super().__init__("pipeline deadlock: " + "; ".join(parts))


@dataclass(frozen=True)
class Interval:
    """One compute action on the timeline of a rank."""

    start: float
    end: float
    kind: str
    chunk: int
    microbatch: int


@dataclass
class SimulationResult:
    """Outcome of :func:`simulate`.

    Attributes:
        step_time: Time until the last rank finished its last action.
        bubble_fraction: ``1 - busy / (pp * step_time)``.
        peak_activations: Per rank, the maximum number of (chunk, microbatch) activations held,
            i.e. forwards done whose backward has not run yet.
        timelines: Per rank, the compute intervals in execution order.
        busy_time: Per rank, the total compute time.
    """

    step_time: float
    bubble_fraction: float
    peak_activations: list[int]
    timelines: list[list[Interval]] = field(repr=False)
    busy_time: list[float] = field(repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly dict of the result."""
        return asdict(self)


@dataclass
class _Rank:
    """Mutable simulation state of one rank."""

    actions: list[Action]
    pc: int = 0
    clock: float = 0.0
    posted_at: float | None = None  # post time of the comm batch at ``pc``, if posted
    received: set = field(default_factory=set)
    fwd_done: set = field(default_factory=set)
    bwd_done: set = field(default_factory=set)
    live: int = 0
    peak: int = 0
    timeline: list[Interval] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.pc >= len(self.actions)

    def batch_end(self) -> int:
        """Index one past the maximal run of comm actions starting at ``pc``."""
        end = self.pc
        while end < len(self.actions) and self.actions[end].is_comm:
            end += 1
        return end


class _Simulation:
    """Runs the ranks' programs; the loop only needs each rank's own clock (order-independent)."""

    def __init__(self, schedule: Schedule, t_fwd: float, t_bwd: float, t_comm: float, vpp: int):
        self.pp, self.vpp, self.t_comm = len(schedule), vpp, t_comm
        self.duration = {"F": t_fwd / vpp, "B": t_bwd / vpp}
        self.ranks = [_Rank(list(actions)) for actions in schedule]
        # Post times of the k-th send / receive on each directed channel (src, dst).
        self.posted: dict[tuple[str, int, int], list[float]] = {}
        # (channel side, index on that channel) for every comm action, by (rank, position).
        self.slot: dict[tuple[int, int], tuple[tuple[str, int, int], int]] = {}
        for rank, actions in enumerate(schedule):
            counts: dict[tuple[str, int, int], int] = {}
            for pos, a in enumerate(actions):
                if a.is_comm:
                    chan = ("S", rank, a.peer) if a.is_send else ("R", a.peer, rank)
                    self.slot[(rank, pos)] = (chan, counts.get(chan, 0))
                    counts[chan] = counts.get(chan, 0) + 1

    def _compute(self, rank: int, st: _Rank, a: Action) -> None:
        stage = virtual_stage(rank, a.chunk, self.pp)
        key = (a.chunk, a.microbatch)
        last = stage == self.pp * self.vpp - 1
        if a.kind == "F":
            missing = key in st.fwd_done and "forward already ran"
            missing = missing or (stage > 0 and ("F", stage - 1, a.microbatch) not in st.received
                                  and "input activation not received (missing RECV_F)")
            st.fwd_done.add(key)
            st.live += 1
        else:
            missing = key in st.bwd_done and "backward already ran"
            missing = missing or (key not in st.fwd_done and "its forward has not run")
            missing = missing or (not last and ("B", stage + 1, a.microbatch) not in st.received
                                  and "output gradient not received (missing RECV_B)")
            st.bwd_done.add(key)
            st.live -= 1
        if missing:
            raise ScheduleError(f"rank {rank}: {a} cannot run: {missing}")
        st.peak = max(st.peak, st.live)
        end = st.clock + self.duration[a.kind]
        st.timeline.append(Interval(st.clock, end, a.kind, a.chunk, a.microbatch))
        st.clock = end

    def _try_batch(self, rank: int, st: _Rank) -> bool:
        """Post the comm batch at ``pc`` (once) and complete it if every peer has posted."""
        end = st.batch_end()
        progressed = False
        if st.posted_at is None:
            st.posted_at = st.clock
            for pos in range(st.pc, end):
                chan, _ = self.slot[(rank, pos)]
                self.posted.setdefault(chan, []).append(st.clock)
            progressed = True
        finish = st.clock
        for pos in range(st.pc, end):
            chan, k = self.slot[(rank, pos)]
            peer_times = self.posted.get(("R" if chan[0] == "S" else "S",) + chan[1:], [])
            if len(peer_times) <= k:
                return progressed
            finish = max(finish, max(st.posted_at, peer_times[k]) + self.t_comm)
        for pos in range(st.pc, end):
            a = st.actions[pos]
            if not a.is_send:
                st.received.add(message_key(a, rank, self.pp))
        st.clock, st.pc, st.posted_at = finish, end, None
        return True

    def _blocked(self) -> dict[int, list[Action]]:
        """Unmatched actions of every unfinished rank (called when nobody can progress)."""
        blocked = {}
        for rank, st in enumerate(self.ranks):
            if st.done:
                continue
            waiting = []
            for pos in range(st.pc, st.batch_end()):
                chan, k = self.slot[(rank, pos)]
                if len(self.posted.get(("R" if chan[0] == "S" else "S",) + chan[1:], [])) <= k:
                    waiting.append(st.actions[pos])
            blocked[rank] = waiting
        return blocked

    def run(self) -> None:
        """Advance all ranks until done; raise PipelineDeadlock if none can move."""
        while not all(st.done for st in self.ranks):
            progressed = False
            for rank, st in enumerate(self.ranks):
                while not st.done:
                    a = st.actions[st.pc]
                    if a.is_comm:
                        if not self._try_batch(rank, st):
                            break
                    else:
                        self._compute(rank, st, a)
                        st.pc += 1
                    progressed = True
            if not progressed:
                raise PipelineDeadlock(self._blocked())


def infer_vpp(schedule: Schedule) -> int:
    """Number of model chunks per rank used by a schedule (1 + largest chunk index)."""
    return 1 + max((a.chunk for actions in schedule for a in actions), default=0)


def simulate(
    schedule: Schedule,
    t_fwd: float = 1.0,
    t_bwd: float = 2.0,
    t_comm: float = 0.0,
    vpp: int | None = None,
) -> SimulationResult:
    """Simulate one training step of a pipeline schedule.

    Args:
        schedule: Per-rank action lists (e.g. from ``build_schedule``).
        t_fwd: Forward time of a whole stage (all of one rank's layers) for one microbatch.
        t_bwd: Backward time of a whole stage for one microbatch.
        t_comm: Transfer time of one send -> receive.
        vpp: Model chunks per rank; inferred from the actions if None.

    Returns:
        The step time, bubble fraction, peak activations and timelines.

    Raises:
        ScheduleError: Unpaired comm, a compute action without its inputs, or a duplicate.
        PipelineDeadlock: If no rank can progress; names the ranks and blocking actions.
    """
    try:
        check_pairing(schedule)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    sim = _Simulation(schedule, t_fwd, t_bwd, t_comm, vpp or infer_vpp(schedule))
    sim.run()
    step = max((st.clock for st in sim.ranks), default=0.0)
    busy = [sum(iv.end - iv.start for iv in st.timeline) for st in sim.ranks]
    bubble = 1.0 - sum(busy) / (len(sim.ranks) * step) if step > 0 else 0.0
    return SimulationResult(
        step_time=step,
        bubble_fraction=bubble,
        peak_activations=[st.peak for st in sim.ranks],
        timelines=[st.timeline for st in sim.ranks],
        busy_time=busy,
    )

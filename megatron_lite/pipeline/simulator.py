"""Event-driven simulator for pipeline schedules.

It reads the same per-rank action lists the executor walks (see ``actions.py`` and
``communication.py``):

* compute actions take ``t_fwd / vpp`` or ``t_bwd / vpp`` (the given times are for a whole
  stage, i.e. all of a rank's layers; each of the ``vpp`` chunks holds ``1/vpp`` of them);
* a maximal run of consecutive comm actions is one batch, posted when the rank reaches it; a
  message moves once both its send and its receive are posted and takes ``t_comm``.

Two executor models (``mode``):

* ``"async"`` (default): posting never blocks; a compute action waits only for the arrival
  of its own input. This is the recommended executor and gives the schedule's ideal timeline.
* ``"rendezvous"``: the rank waits at each batch until all its messages moved, sends included
  (a send needs its receive posted, as NCCL). The strictest model: a schedule that does not
  deadlock here does not deadlock on any executor following the posting rule.

With ``dp_comm`` (see ``dp_comm.py``) every rank also has a data-parallel stream: ZeRO-3
per-chunk weight all-gathers (prefetched one pass ahead; compute waits for an unfinished one)
and per-chunk gradient reduce-scatters overlap compute; the step ends when the stream drains.

It checks that every receive has its matching send (per directed channel, in order), that
every compute action has its inputs (a forward its activation, a backward its forward and its
output gradient), runs once, and reports a deadlock with the blocked ranks and actions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_lite.pipeline.actions import Action, Schedule, check_pairing, message_key
from megatron_lite.pipeline.dp_comm import CommEvent, DataParallelComm, DataParallelStreams
from megatron_lite.pipeline.placement import virtual_stage

MODES = ("async", "rendezvous")


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
        dp_events: Per rank, the data-parallel collectives (empty without ``dp_comm``).
        compute_end: Per rank, when its last compute action ended (step_time also waits for
            the data-parallel stream).
    """

    step_time: float
    bubble_fraction: float
    peak_activations: list[int]
    timelines: list[list[Interval]] = field(repr=False)
    busy_time: list[float] = field(repr=False)
    dp_events: list[list[CommEvent]] = field(default_factory=list, repr=False)
    compute_end: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """JSON-friendly dict of the result."""
        return asdict(self)


@dataclass
class _Rank:
    """Mutable simulation state of one rank."""

    actions: list[Action]
    pc: int = 0
    clock: float = 0.0
    posted_at: float | None = None  # rendezvous: post time of the comm batch at ``pc``
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
    """Runs the ranks' programs.

    Each rank advances as far as it can, in turn, until all are done or none can move. Times
    depend only on each rank's own clock and the post times of its peers, so the visiting
    order does not change the result.
    """

    def __init__(
        self,
        schedule: Schedule,
        durations: dict[str, float],
        t_comm: float,
        vpp: int,
        mode: str,
        dp_comm: DataParallelComm | None = None,
    ):
        self.pp, self.vpp, self.t_comm, self.mode = len(schedule), vpp, t_comm, mode
        self.dp = None if dp_comm is None else DataParallelStreams(dp_comm, schedule)
        self.duration = durations
        self.ranks = [_Rank(list(actions)) for actions in schedule]
        # Post time of the send ("S", key) / receive ("R", key) of every message posted so far.
        self.posted: dict[tuple[str, tuple], float] = {}
        self.recv_action: dict[tuple, Action] = {}
        self.key: dict[tuple[int, int], tuple] = {}
        for rank, actions in enumerate(schedule):
            for pos, a in enumerate(actions):
                if a.is_comm:
                    self.key[(rank, pos)] = message_key(a, rank, self.pp)
                    if not a.is_send:
                        self.recv_action[self.key[(rank, pos)]] = a

    # ----------------------------------------------------------------------- compute

    def _input_key(self, rank: int, a: Action) -> tuple | None:
        """Key of the message a compute action consumes; None if its input is local."""
        stage = virtual_stage(rank, a.chunk, self.pp)
        if a.kind == "F":
            return None if stage == 0 else ("F", stage - 1, a.microbatch)
        return None if stage == self.pp * self.vpp - 1 else ("B", stage + 1, a.microbatch)

    def _check(self, rank: int, st: _Rank, a: Action) -> None:
        """Raise ScheduleError for a duplicate compute, a backward before its forward, or a
        compute whose input receive was never posted before it."""
        key = (a.chunk, a.microbatch)
        done = st.fwd_done if a.kind == "F" else st.bwd_done
        problem = None
        if key in done:
            problem = "it already ran"
        elif a.kind == "B" and key not in st.fwd_done:
            problem = "its forward has not run"
        else:
            msg = self._input_key(rank, a)
            if msg is not None and ("R", msg) not in self.posted:
                problem = f"no RECV_{a.kind} of its input was posted before it"
        if problem:
            raise ScheduleError(f"rank {rank}: {a} cannot run: {problem}")

    def _start_time(self, rank: int, st: _Rank, a: Action) -> float | None:
        """When compute ``a`` can start, or None while its input has not been sent (async)."""
        self._check(rank, st, a)
        msg = self._input_key(rank, a)
        if msg is None or self.mode == "rendezvous":
            # Rendezvous: the receive's batch completed before the rank got here.
            return st.clock
        sent = self.posted.get(("S", msg))
        if sent is None:
            return None
        return max(st.clock, max(sent, self.posted[("R", msg)]) + self.t_comm)

    def _compute(self, rank: int, st: _Rank, a: Action, start: float) -> None:
        if self.dp is not None:  # wait for this chunk's weights to be gathered
            start = self.dp.before_compute(rank, st.pc, start)
        key = (a.chunk, a.microbatch)
        (st.fwd_done if a.kind == "F" else st.bwd_done).add(key)
        st.live += 1 if a.kind == "F" else -1
        st.peak = max(st.peak, st.live)
        end = start + self.duration[a.kind]
        st.timeline.append(Interval(start, end, a.kind, a.chunk, a.microbatch))
        if self.dp is not None:
            self.dp.after_compute(rank, st.pc, end)
        st.clock = end
        st.pc += 1

    # ----------------------------------------------------------------------- communication

    def _side(self, rank: int, pos: int) -> tuple[str, tuple]:
        """(own side, message key) of the comm action at ``pos`` of ``rank``."""
        return ("S" if self.ranks[rank].actions[pos].is_send else "R"), self.key[(rank, pos)]

    def _peer_post(self, rank: int, pos: int) -> float | None:
        """When the other end of this comm action was posted (None: not yet)."""
        side, key = self._side(rank, pos)
        return self.posted.get(("R" if side == "S" else "S", key))

    def _batch(self, rank: int, st: _Rank) -> bool:
        """Post the comm batch at ``pc`` (once); move past it when the mode allows."""
        end = st.batch_end()
        progressed = False
        if st.posted_at is None:
            st.posted_at = st.clock
            for pos in range(st.pc, end):
                self.posted[self._side(rank, pos)] = st.clock
            progressed = True
        finish = st.clock
        if self.mode == "rendezvous":
            for pos in range(st.pc, end):
                peer_time = self._peer_post(rank, pos)
                if peer_time is None:
                    return progressed
                finish = max(finish, max(st.posted_at, peer_time) + self.t_comm)
        st.clock, st.pc, st.posted_at = finish, end, None
        return True

    def _blocked(self) -> dict[int, list[Action]]:
        """What every unfinished rank waits on (called when nobody can progress)."""
        blocked = {}
        for rank, st in enumerate(self.ranks):
            if st.done:
                continue
            a = st.actions[st.pc]
            if a.is_comm:
                pending = range(st.pc, st.batch_end())
                blocked[rank] = [st.actions[p] for p in pending if self._peer_post(rank, p) is None]
            else:
                blocked[rank] = [self.recv_action[self._input_key(rank, a)], a]
        return blocked

    def run(self) -> None:
        """Advance all ranks until done; raise PipelineDeadlock if none can move."""
        while not all(st.done for st in self.ranks):
            progressed = False
            for rank, st in enumerate(self.ranks):
                while not st.done:
                    a = st.actions[st.pc]
                    if a.is_comm:
                        if not self._batch(rank, st):
                            break
                    else:
                        start = self._start_time(rank, st, a)
                        if start is None:
                            break
                        self._compute(rank, st, a, start)
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
    mode: str = "async",
    check_order: bool = True,
    dp_comm: DataParallelComm | None = None,
) -> SimulationResult:
    """Simulate one training step of a pipeline schedule.

    Args:
        schedule: Per-rank action lists (e.g. from ``build_schedule``).
        t_fwd: Forward time of a whole stage (all of one rank's layers) for one microbatch.
        t_bwd: Backward time of a whole stage for one microbatch.
        t_comm: Transfer time of one send -> receive.
        vpp: Model chunks per rank; inferred from the actions if None.
        mode: "async" (default): posting a batch never blocks; a compute action waits for
            the arrival of its input. "rendezvous": a rank waits at every batch until each of
            its messages has been transferred, sends included (the strictest executor).
        check_order: Check that each channel's sends and receives pair up in order (as NCCL
            needs). Messages are matched by identity either way.
        dp_comm: Data-parallel communication (ZeRO-1/3 collectives on a separate stream per
            rank, see ``dp_comm.py``); None: no data-parallel communication.

    Returns:
        The step time, bubble fraction, peak activations and timelines.

    Raises:
        ScheduleError: Unpaired comm, a compute action without its inputs, or a duplicate.
        PipelineDeadlock: If no rank can progress; names the ranks and blocking actions.
    """
    if mode not in MODES:
        raise ValueError(f"simulation mode {mode!r} is not one of {MODES}")
    if check_order:
        try:
            check_pairing(schedule)
        except ValueError as e:
            raise ScheduleError(str(e)) from None
    vpp = vpp or infer_vpp(schedule)
    # The given times are for a whole stage; each of the vpp chunks holds 1/vpp of its layers.
    durations = {"F": t_fwd / vpp, "B": t_bwd / vpp}
    sim = _Simulation(schedule, durations, t_comm, vpp, mode, dp_comm)
    sim.run()
    compute_end = [st.clock for st in sim.ranks]
    ends = compute_end if sim.dp is None else [sim.dp.finish(r, t) for r, t in enumerate(compute_end)]
    step = max(ends, default=0.0)
    busy = [sum(iv.end - iv.start for iv in st.timeline) for st in sim.ranks]
    bubble = 1.0 - sum(busy) / (len(sim.ranks) * step) if step > 0 else 0.0
    return SimulationResult(
        step_time=step,
        bubble_fraction=bubble,
        peak_activations=[st.peak for st in sim.ranks],
        timelines=[st.timeline for st in sim.ranks],
        busy_time=busy,
        dp_events=[] if sim.dp is None else [s.events for s in sim.dp.streams],
        compute_end=compute_end,
    )

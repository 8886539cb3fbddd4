"""Data-parallel communication model for the pipeline simulator (ZeRO-1 and ZeRO-3).

Every pipeline rank has one data-parallel (DP) comm stream, separate from compute and from the
pipeline's point-to-point transfers. Collectives on it run one after another, in the order they
are issued; compute waits only for the all-gather whose weights it needs. All ``dp`` replicas
of a rank run the same timeline, so a collective starts as soon as it is issued and the
stream is free.

Cost of one collective over ``dp`` ranks moving ``nbytes`` (the full, unsharded tensor of one
rank; a ring all-gather / reduce-scatter)::

    t = (dp - 1) / dp * nbytes / bandwidth + (dp - 1) * latency

(``dp - 1`` ring steps, each sending ``nbytes / dp`` and paying ``latency``.) With dp == 1 it
is 0.

What is issued, per rank and step (chunk = one of the rank's ``vpp`` model chunks):

* ZeRO-3 (``parameters``): a *pass* of a chunk is a maximal run of its forwards (or its
  backwards) in the rank's forward (backward) order, the other kind ignored: breadth-first has
  one forward and one backward pass per chunk; interleaved has one of each per group of
  microbatches. The chunk's weights are all-gathered before the first compute of every pass
  and freed after it. Gathers are prefetched one pass ahead: the gather of pass ``i + 1`` is
  issued when pass ``i`` starts computing (pass 0's at time 0), as FSDP's forward/backward
  prefetch does. The gradients of a chunk are reduce-scattered once, issued when its last
  backward of the step ends (so interleaved keeps a chunk's unsharded gradient between its
  backward passes; a reduce-scatter per backward pass would add ``passes - 1`` per chunk);
  then the optimizer step (``t_optimizer``) runs when the stream is drained. Nothing else:
  the next step's gathers belong to the next step.
* ZeRO-1 (``optimizer``): no gathers during the step (full weights everywhere); the same
  reduce-scatter per chunk after its last backward, overlapping the remaining compute; after
  the optimizer step the updated weights are all-gathered, one collective per chunk,
  *not* overlapped with anything (Megatron's distributed optimizer without
  ``overlap_param_gather``), so they add to the step time.
* ``overlap_reduce=False`` (either stage) holds every reduce-scatter until the rank's last
  compute ends: Megatron-LM's data parallelism before ``overlap_grad_reduce``, the baseline the
  paper measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_lite.pipeline.actions import Action

ZERO_STAGES = (1, 3)


@dataclass(frozen=True)
class DataParallelComm:
    """Data-parallel communication costs of one pipeline rank.

    Attributes:
        dp: Data-parallel size (ring length).
        zero: 1 (optimizer states sharded; grads reduce-scattered, weights all-gathered after
            the step) or 3 (weights sharded too; gathered per chunk pass).
        param_bytes_per_chunk: Bytes of one chunk's weights on one rank, unsharded (after
            tensor parallelism), in the dtype they are gathered in (e.g. 2 per bf16 weight).
        grad_bytes_per_chunk: Bytes of one chunk's gradients as reduce-scattered; None: the
            same as ``param_bytes_per_chunk``.
        bandwidth: Bytes per simulator time unit per rank (``math.inf``: free transfers).
        latency: Time per ring step, in simulator time units.
        t_optimizer: Optimizer step time, after the last reduce-scatter.
        overlap_reduce: Issue each chunk's reduce-scatter right after its last backward (the
            default, as the executor does). False: all of them after the rank's last compute,
            as Megatron-LM did before ``overlap_grad_reduce`` (the paper's baseline).
    """

    dp: int
    zero: int
    param_bytes_per_chunk: float
    grad_bytes_per_chunk: float | None = None
    bandwidth: float = math.inf
    latency: float = 0.0
    t_optimizer: float = 0.0
    overlap_reduce: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"data-parallel comm: dp ({self.dp}) must be a positive integer")
        if self.zero not in ZERO_STAGES:
            raise ValueError(f"data-parallel comm: zero ({self.zero}) must be one of {ZERO_STAGES}")
        for name in ("param_bytes_per_chunk", "grad_bytes_per_chunk", "latency", "t_optimizer"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"data-parallel comm: {name} ({value}) must be >= 0")
        if not self.bandwidth > 0:
            raise ValueError(f"data-parallel comm: bandwidth ({self.bandwidth}) must be > 0")

    def collective_time(self, nbytes: float) -> float:
        """Ring all-gather / reduce-scatter time of a tensor of ``nbytes`` (unsharded)."""
        if self.dp == 1:
            return 0.0
        return (self.dp - 1) / self.dp * nbytes / self.bandwidth + (self.dp - 1) * self.latency

    @property
    def t_gather(self) -> float:
        """Time of one chunk's weight all-gather."""
        return self.collective_time(self.param_bytes_per_chunk)

    @property
    def t_reduce(self) -> float:
        """Time of one chunk's gradient reduce-scatter."""
        grad = self.param_bytes_per_chunk if self.grad_bytes_per_chunk is None else self.grad_bytes_per_chunk
        return self.collective_time(grad)


@dataclass(frozen=True)
class CommEvent:
    """One collective on a rank's data-parallel stream."""

    start: float
    end: float
    kind: str  # "all_gather" | "reduce_scatter" | "optimizer"
    chunk: int


def chunk_passes(actions: list[Action]) -> list[int]:
    """Positions (in ``actions``) of the first compute action of every ZeRO-3 pass, in order.

    A forward pass of a chunk is a maximal run of its forwards in the rank's sequence of
    forwards (backwards ignored); the same for backwards.
    """
    firsts, last_chunk = [], {"F": None, "B": None}
    for pos, a in enumerate(actions):
        if a.is_comm:
            continue
        if a.chunk != last_chunk[a.kind]:
            firsts.append(pos)
        last_chunk[a.kind] = a.chunk
    return firsts


def last_backwards(actions: list[Action]) -> dict[int, int]:
    """Position of each chunk's last backward -> chunk."""
    last = {a.chunk: pos for pos, a in enumerate(actions) if a.kind == "B"}
    return {pos: chunk for chunk, pos in last.items()}


@dataclass
class _Stream:
    """The data-parallel stream of one rank: FIFO collectives and the gathers compute awaits."""

    passes: list[int]  # action positions starting a pass (ZeRO-3; empty for ZeRO-1)
    reduce_at: dict[int, int]  # action position -> chunk whose reduce-scatter follows it
    free_at: float = 0.0
    gather_end: dict[int, float] = field(default_factory=dict)  # pass position -> end time
    events: list[CommEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pass_index = {pos: i for i, pos in enumerate(self.passes)}

    def issue(self, t: float, duration: float, kind: str, chunk: int) -> float:
        start = max(t, self.free_at)
        self.free_at = start + duration
        self.events.append(CommEvent(start, self.free_at, kind, chunk))
        return self.free_at


class DataParallelStreams:
    """Per-rank DP streams driven by the simulator's compute hooks."""

    def __init__(self, cfg: DataParallelComm, schedule: list[list[Action]]) -> None:
        self.cfg = cfg
        self.actions = schedule
        self.streams = [
            _Stream(chunk_passes(actions) if cfg.zero == 3 else [], last_backwards(actions))
            for actions in schedule
        ]
        if cfg.zero == 3:
            for rank, st in enumerate(self.streams):
                if st.passes:  # pass 0's gather goes out at the start of the step
                    self._gather(rank, 0, 0.0)

    def _gather(self, rank: int, index: int, t: float) -> None:
        st = self.streams[rank]
        pos = st.passes[index]
        st.gather_end[pos] = st.issue(t, self.cfg.t_gather, "all_gather", self.actions[rank][pos].chunk)

    def before_compute(self, rank: int, pos: int, start: float) -> float:
        """Start time of the compute at ``pos`` once its chunk's weights are gathered."""
        st = self.streams[rank]
        if pos not in st.gather_end:
            return start
        start = max(start, st.gather_end[pos])
        index = st.pass_index[pos]
        if index + 1 < len(st.passes):  # prefetch the next pass's weights
            self._gather(rank, index + 1, start)
        return start

    def after_compute(self, rank: int, pos: int, end: float) -> None:
        """Issue a chunk's gradient reduce-scatter after its last backward."""
        st = self.streams[rank]
        if pos in st.reduce_at and self.cfg.overlap_reduce:
            st.issue(end, self.cfg.t_reduce, "reduce_scatter", st.reduce_at[pos])

    def finish(self, rank: int, clock: float) -> float:
        """End of the rank's step: optimizer after the last reduce-scatter (+ ZeRO-1 gathers)."""
        st = self.streams[rank]
        if not self.cfg.overlap_reduce:
            for pos in sorted(st.reduce_at):
                st.issue(clock, self.cfg.t_reduce, "reduce_scatter", st.reduce_at[pos])
        st.issue(clock, self.cfg.t_optimizer, "optimizer", -1)
        if self.cfg.zero == 1:
            for chunk in sorted({a.chunk for a in self.actions[rank] if not a.is_comm}):
                st.issue(st.free_at, self.cfg.t_gather, "all_gather", chunk)
        return st.free_at

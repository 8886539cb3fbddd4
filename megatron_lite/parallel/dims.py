"""The rank grid: which ranks form each tensor/pipeline/data/expert parallel group.

Dense layers use the grid ``tp x cp x dp x pp``. Rank order follows Megatron: tp varies fastest,
then cp (context parallel: the sequence split over ranks), then dp, then pp, so a TP group is a
block of consecutive ranks and sits inside one node, with its CP peers next to it::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Context-parallel ranks hold the same parameters and see different tokens of the same samples, so
gradients are summed (and the distributed optimizer shards) over ``dp_cp``, the dp x cp ranks of
one tp/pp position, as in Megatron; data is sampled per dp rank only.

MoE layers fold a second grid over the same ranks (Megatron "MoE parallel folding"): within one
pipeline stage the ``tp * cp * dp`` ranks are re-read as ``etp x ep x edp``, again fastest first::

    rank = etp_rank + etp * (ep_rank + ep * (edp_rank + edp * pp_rank))

With ``etp == tp`` the EP groups sit inside the dense DP groups, the classic layout.

A ``ParallelDims`` is pure arithmetic until ``create_groups()`` is called, so any layout can be
built and checked for any world size without processes. It is passed explicitly; nothing here is
module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_lite.config import ConfigError

# Every group kind, in creation order (all ranks must create all groups in the same order).
GROUP_NAMES = ("tp", "dp", "pp", "mp", "tp_dp", "embedding", "etp", "ep", "edp", "etp_ep", "cp", "dp_cp")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits in the dense and the expert grids: indices and group sizes."""

    rank: int
    tp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int
    tp_size: int
    dp_size: int
    pp_size: int
    etp_size: int
    ep_size: int
    edp_size: int
    cp: int = 0
    cp_size: int = 1

    @property
    def dp_cp(self) -> int:
        """Index in the dp x cp group (its ranks in rank order: cp varies fastest)."""
        return self.cp + self.cp_size * self.dp

    @property
    def dp_cp_size(self) -> int:
        """Size of the dp x cp group."""
        return self.dp_size * self.cp_size

    def index(self, group: str) -> int:
        """Index of this rank inside its ``group`` ("tp", "ep", "etp", ...)."""
        return getattr(self, group)

    def size(self, group: str) -> int:
        """Size of this rank's ``group``."""
        return getattr(self, f"{group}_size")


class ParallelDims:
    """Degrees of parallelism over ``world_size`` ranks and the rank lists of every group.

    Build with :meth:`build` (or :meth:`from_config`); it validates before anything is allocated.
    ``create_groups()`` then creates the torch.distributed groups for the calling process.
    """

    def __init__(self, world_size: int, tp: int, pp: int, dp: int, ep: int, etp: int, edp: int, cp: int = 1):
        self.world_size, self.tp, self.pp, self.dp, self.cp = world_size, tp, pp, dp, cp
        self.ep, self.etp, self.edp = ep, etp, edp
        self._groups: dict[str, object] | None = None
        self._rank_lists: dict[str, list[list[int]]] = {}
        self.rank: int | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, cp: int = 1
    ) -> ParallelDims:
        """Derive dp and edp from the world size and check that the degrees tile it.

        Args:
            world_size: number of ranks.
            tp: tensor parallel size of dense layers.
            pp: pipeline parallel size.
            ep: expert parallel size (MoE layers).
            etp: tensor parallel size inside each expert (None: same as ``tp``).
            cp: context parallel size (the sequence of every sample split over cp ranks).

        Raises:
            ConfigError: naming the offending degree and numbers.
        """
        etp = tp if etp is None else etp
        for name, value in (
            ("world_size", world_size),
            ("tensor_parallel", tp),
            ("pipeline_parallel", pp),
            ("expert_parallel", ep),
            ("expert_tensor_parallel", etp),
            ("context_parallel", cp),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} ({value!r}) must be a positive integer")
        with_cp = f" x context_parallel ({cp})" if cp > 1 else ""
        if world_size % (tp * cp * pp):
            raise ConfigError(
                f"world_size ({world_size}) is not divisible by tensor_parallel ({tp}){with_cp} x "
                f"pipeline_parallel ({pp}) = {tp * cp * pp}"
            )
        dp = world_size // (tp * cp * pp)
        stage = tp * cp * dp
        if stage % (etp * ep):
            raise ConfigError(
                f"expert_tensor_parallel ({etp}) x expert_parallel ({ep}) = {etp * ep} does not divide "
                f"tensor_parallel ({tp}){with_cp} x data_parallel ({dp}) = {stage} "
                "(the ranks of one pipeline stage)"
            )
        return cls(world_size, tp, pp, dp, ep, etp, stage // (etp * ep), cp)

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> ParallelDims:
        """Build from a ``ParallelConfig`` (``expert_tensor`` None means "same as tensor")."""
        return cls.build(
            world_size,
            tp=parallel_cfg.tensor,
            pp=parallel_cfg.pipeline,
            ep=parallel_cfg.expert,
            etp=parallel_cfg.expert_tensor,
            cp=getattr(parallel_cfg, "context", 1),
        )

    def __repr__(self) -> str:
        return (
            f"ParallelDims(world={self.world_size}, tp={self.tp}, cp={self.cp}, dp={self.dp}, pp={self.pp}, "
            f"ep={self.ep}, etp={self.etp}, edp={self.edp})"
        )

    # ------------------------------------------------------------------ pure arithmetic

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (``tp * cp * dp == etp * ep * edp``)."""
        return self.tp * self.cp * self.dp

    def coords(self, rank: int) -> RankCoords:
        """Indices of ``rank`` in every grid."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({self.world_size}))")
        pp_rank, local = divmod(rank, self.stage_size)
        return RankCoords(
            rank=rank,
            tp=local % self.tp,
            dp=local // (self.tp * self.cp),
            pp=pp_rank,
            etp=local % self.etp,
            ep=(local // self.etp) % self.ep,
            edp=local // (self.etp * self.ep),
            tp_size=self.tp,
            dp_size=self.dp,
            pp_size=self.pp,
            etp_size=self.etp,
            ep_size=self.ep,
            edp_size=self.edp,
            cp=(local // self.tp) % self.cp,
            cp_size=self.cp,
        )

    def rank_lists(self, name: str) -> list[list[int]]:
        """Every group of kind ``name`` as a list of global ranks (ordered by index in the group).

        Kinds: ``tp``, ``dp``, ``pp``; ``mp`` (tp x pp, model parallel); ``tp_dp`` (all ranks of one
        pipeline stage: they share the global batch); ``embedding`` (first and last stage, for tied
        embeddings); ``etp``, ``ep``, ``edp`` (expert grid); ``etp_ep`` (one expert-model-parallel
        block: the ranks that exchange tokens in a MoE layer); ``cp`` (context parallel: the ranks
        sharing one sequence) and ``dp_cp`` (dp x cp: the ranks over which dense gradients are
        summed and the distributed optimizer shards).
        """
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")
        if name not in self._rank_lists:
            self._rank_lists[name] = self._compute_rank_lists(name)
        return [list(g) for g in self._rank_lists[name]]

    def _compute_rank_lists(self, name: str) -> list[list[int]]:
        key = _GROUP_KEYS[name]
        groups: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            if name == "embedding" and c.pp not in (0, self.pp - 1):
                continue
            groups.setdefault(key(c), []).append(r)
        return [sorted(g) for g in sorted(groups.values())]

    def group_ranks(self, name: str, rank: int) -> list[int]:
        """The ranks of ``rank``'s group of kind ``name`` (empty if it belongs to none)."""
        return next((g for g in self.rank_lists(name) if rank in g), [])

    # ------------------------------------------------------------------ process groups

    def create_groups(self, timeout=None) -> None:
        """Create every process group (all ranks must call this, in the same order); idempotent.

        ``timeout`` (a ``datetime.timedelta``) bounds each collective of the new groups; None keeps
        torch's default (sub-groups do not inherit the default group's timeout).

        Without an initialised default group and with ``world_size == 1`` no group is created:
        :meth:`group` then returns None, which the comm primitives treat as "just this rank".
        """
        if self._groups is not None:
            return
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(
                    f"create_groups needs torch.distributed initialised for world_size {self.world_size}"
                )
            self.rank, self._groups = 0, {}
            return
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"ParallelDims was built for world_size {self.world_size} but "
                f"torch.distributed has {dist.get_world_size()} ranks"
            )
        self.rank = dist.get_rank()
        groups: dict[str, object] = {}
        for name in GROUP_NAMES:
            if self.cp == 1 and name in _CP_ALIASES:
                continue  # without cp the cp groups are single ranks and dp_cp is dp: no new groups
            for ranks in self.rank_lists(name):
                pg = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    groups[name] = pg
        if self.cp == 1:
            groups.update({name: groups.get(alias) for name, alias in _CP_ALIASES.items()})
        self._groups = groups

    def destroy_groups(self) -> None:
        """Destroy the groups this object created (tests create many layouts in one process)."""
        unique = {id(pg): pg for pg in (self._groups or {}).values() if pg is not None}  # dp_cp may alias dp
        for pg in unique.values():
            dist.destroy_process_group(pg)
        self._groups = None

    def group(self, name: str):
        """This process's group of kind ``name`` (None only in a world of one without torch.distributed)."""
        if self._groups is None:
            raise RuntimeError("call ParallelDims.create_groups() first")
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group {name!r}; known: {', '.join(GROUP_NAMES)}")
        return self._groups.get(name)

    @property
    def local(self) -> RankCoords:
        """Coordinates of the calling process (after ``create_groups``)."""
        if self.rank is None:
            raise RuntimeError("call ParallelDims.create_groups() first")
        return self.coords(self.rank)


# With cp == 1: group kind -> the group that stands for it (None: a single rank).
_CP_ALIASES = {"cp": None, "dp_cp": "dp"}

# Two ranks share a group of kind k iff these keys are equal.
_GROUP_KEYS = {
    "tp": lambda c: (c.pp, c.dp, c.cp),
    "dp": lambda c: (c.pp, c.tp, c.cp),
    "pp": lambda c: (c.dp, c.cp, c.tp),
    "mp": lambda c: (c.dp, c.cp),
    "tp_dp": lambda c: (c.pp,),
    "embedding": lambda c: (c.dp, c.cp, c.tp),
    "etp": lambda c: (c.pp, c.edp, c.ep),
    "ep": lambda c: (c.pp, c.edp, c.etp),
    "edp": lambda c: (c.pp, c.ep, c.etp),
    "etp_ep": lambda c: (c.pp, c.edp),
    "cp": lambda c: (c.pp, c.dp, c.tp),
    "dp_cp": lambda c: (c.pp, c.tp),
}


def validate_layout(model_cfg, parallel_cfg, world_size: int, seq_length: int | None = None) -> ParallelDims:
    """Check that the model can be laid out on this grid; raise ``ConfigError`` before any tensor exists.

    Args:
        model_cfg: validated ``ModelConfig`` (``head_dim`` resolved).
        parallel_cfg: ``ParallelConfig``.
        world_size: number of ranks.
        seq_length: if given, also checks it splits over tensor parallel where sequences are split.

    Returns:
        The ``ParallelDims`` (without process groups).
    """
    dims = ParallelDims.from_config(parallel_cfg, world_size)
    tp, etp, ep = dims.tp, dims.etp, dims.ep
    nq, nkv = model_cfg.num_attention_heads, model_cfg.num_kv_heads
    _divisible("model.num_attention_heads", nq, "tensor_parallel", tp)
    if nkv >= tp:
        _divisible("model.num_kv_heads", nkv, "tensor_parallel", tp)
    elif tp % nkv:
        raise ConfigError(
            f"tensor_parallel ({tp}) is not divisible by model.num_kv_heads ({nkv}): with fewer KV heads "
            "than tensor-parallel ranks each KV head is replicated on tensor_parallel / num_kv_heads ranks"
        )
    if model_cfg.is_moe:
        _divisible("model.num_experts", model_cfg.num_experts, "expert_parallel", ep)
        _divisible("model.intermediate_size", model_cfg.intermediate_size, "expert_tensor_parallel", etp)
    else:
        _divisible("model.intermediate_size", model_cfg.intermediate_size, "tensor_parallel", tp)
        if ep > 1:
            raise ConfigError(
                f"expert_parallel ({ep}) > 1 needs a mixture-of-experts model "
                f"(model.arch is {model_cfg.arch!r})"
            )
    cp = dims.cp
    if seq_length is not None and cp > 1 and seq_length % (2 * cp):
        raise ConfigError(
            f"data.seq_length ({seq_length}) is not divisible by 2 x parallel.context ({cp}) = {2 * cp}: "
            "context parallelism gives every rank two of 2 x cp equal chunks of each sequence"
        )
    splits_sequence = parallel_cfg.sequence_parallel or model_cfg.is_moe
    if seq_length is not None and splits_sequence and tp > 1:
        local = seq_length // cp
        if local % tp:
            what = (
                f"data.seq_length ({seq_length}) / parallel.context ({cp}) = {local}"
                if cp > 1
                else f"data.seq_length ({seq_length})"
            )
            raise ConfigError(f"{what} is not divisible by tensor_parallel ({tp})")
    return dims


def _divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ConfigError(f"{name} ({value}) is not divisible by {by_name} ({by})")

"""The single description of how every parameter is sharded (DESIGN principle 4).

Each canonical parameter name maps to a ``ShardSpec``: its full (unsharded) shape and zero or
more ``Axis`` entries, each saying which dim is split over which group ("tp", "ep" or "etp").
A split dim is a concatenation of ``Block``s (one for a plain split; three for the fused
``wqkv`` rows [Q ; K ; V]; two for the fused ``w13`` rows [gate ; up]). Every block is split on
its own over the group and the local pieces are concatenated, so a rank's ``wqkv`` shard is
[Q_local ; K_local ; V_local]. A block made of fewer units (heads) than ranks is replicated:
with ``nkv < tp`` rank r holds KV head ``r // (tp // nkv)``. A block may be padded at its end
(the vocabulary, to a multiple of ``128 * tp`` as Megatron does); padding rows are zeros and
never appear in the canonical tensor.

Which rule holds for which parameter is each family's sharding table (a tuple of ``ShardRule``:
name pattern -> layout, next to the model in ``models/``); this module knows the layouts only.
Everything that moves weights between layouts (parallelize, checkpoint save/load/resharding,
HF conversion) goes through ``shard_spec_for`` / ``shard_tensor`` / ``unshard_tensors``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class Block:
    """A contiguous run of ``size`` rows of a split dim, made of indivisible units of ``unit_size``."""

    size: int
    unit_size: int = 1
    pad_multiple: int = 1  # pad the block to a multiple of pad_multiple * group size

    def padded_size(self, g: int) -> int:
        """Rows after padding for a group of ``g`` ranks."""
        m = self.pad_multiple * g if self.pad_multiple > 1 else 1
        return -(-self.size // m) * m

    def units(self, g: int) -> int:
        """Number of units after padding."""
        return self.padded_size(g) // self.unit_size

    def replicas(self, g: int) -> int:
        """How many ranks hold each unit (> 1 when there are fewer units than ranks)."""
        return max(1, g // self.units(g))

    def local_range(self, g: int, r: int) -> tuple[int, int]:
        """Rows ``[start, end)`` (in padded block coordinates) held by index ``r`` of ``g``."""
        units = self.units(g)
        if units >= g:
            if units % g:
                raise ValueError(f"{units} units of {self.unit_size} rows do not split over {g} ranks")
            per = units // g
            return r * per * self.unit_size, (r + 1) * per * self.unit_size
        if g % units:
            raise ValueError(f"{g} ranks cannot replicate {units} units evenly")
        unit = r // (g // units)
        return unit * self.unit_size, (unit + 1) * self.unit_size


@dataclass(frozen=True)
class Axis:
    """Dim ``dim`` is split over ``group``, block by block."""

    dim: int
    group: str  # "tp" | "ep" | "etp"
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class ShardSpec:
    """How one canonical parameter is laid out over the rank grid."""

    name: str
    kind: str  # replicated | vocab | fused_qkv | row | fused_gate_up | expert_w13 | expert_w2
    shape: tuple[int, ...]
    axes: tuple[Axis, ...] = ()

    @property
    def is_expert(self) -> bool:
        """Sharded over the expert grid (its gradients reduce over edp, not dp)."""
        return any(a.group in ("ep", "etp") for a in self.axes)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Vocabulary rounded up to a multiple of ``multiple * tp`` (Megatron's padding)."""
    return Block(vocab_size, 1, multiple).padded_size(tp)


# ---------------------------------------------------------------- the rules


def _vocab(name, c):
    return ShardSpec(
        name,
        "vocab",
        (c.vocab_size, c.hidden_size),
        (Axis(0, "tp", (Block(c.vocab_size, 1, VOCAB_PAD_MULTIPLE),)),),
    )


def _qkv(name, c):
    hd, nq, nkv = c.head_dim, c.num_attention_heads, c.num_kv_heads
    blocks = (Block(nq * hd, hd), Block(nkv * hd, hd), Block(nkv * hd, hd))
    return ShardSpec(name, "fused_qkv", ((nq + 2 * nkv) * hd, c.hidden_size), (Axis(0, "tp", blocks),))


def _wo(name, c):
    hd, nq = c.head_dim, c.num_attention_heads
    return ShardSpec(name, "row", (c.hidden_size, nq * hd), (Axis(1, "tp", (Block(nq * hd, hd),)),))


def _w13(name, c):
    f = c.intermediate_size
    return ShardSpec(name, "fused_gate_up", (2 * f, c.hidden_size), (Axis(0, "tp", (Block(f), Block(f))),))


def _w2(name, c):
    f = c.intermediate_size
    return ShardSpec(name, "row", (c.hidden_size, f), (Axis(1, "tp", (Block(f),)),))


def _experts_w13(name, c):
    e, f = c.num_experts, c.intermediate_size
    axes = (Axis(0, "ep", (Block(e),)), Axis(1, "etp", (Block(f), Block(f))))
    return ShardSpec(name, "expert_w13", (e, 2 * f, c.hidden_size), axes)


def _experts_w2(name, c):
    e, f = c.num_experts, c.intermediate_size
    axes = (Axis(0, "ep", (Block(e),)), Axis(2, "etp", (Block(f),)))
    return ShardSpec(name, "expert_w2", (e, c.hidden_size, f), axes)


def _norm(name, c):
    return ShardSpec(name, "replicated", (c.hidden_size,))


def _router(name, c):
    return ShardSpec(name, "replicated", (c.num_experts, c.hidden_size))


# Layouts a family's sharding table can name. Each one also says which parallel style
# ``parallelize`` applies (``parallel.styles.styles_for_rule``), so the table is the only place a
# parameter's split is written down.
LAYOUTS = {
    "vocab_embedding": _vocab,  # token embedding, rows = padded vocabulary over tp
    "vocab_output": _vocab,  # output layer (absent when tied: the embedding's shard is reused)
    "norm": _norm,  # replicated; partial gradients over tp under sequence parallel
    "fused_qkv": _qkv,  # column-parallel [Q; K; V] by heads (KV replicated when nkv < tp)
    "row_heads": _wo,  # row-parallel attention output projection, split by heads
    "fused_gate_up": _w13,  # column-parallel [gate; up]
    "row": _w2,  # row-parallel feed-forward down projection
    "router": _router,  # replicated MoE router
    "expert_w13": _experts_w13,  # experts over ep, [gate; up] over etp
    "expert_w2": _experts_w2,  # experts over ep, input features over etp
}


@dataclass(frozen=True)
class ShardRule:
    """One row of a family's sharding table: canonical parameter name pattern -> layout.

    Attributes:
        pattern: canonical parameter name; ``*`` stands for one name component (a layer index).
        layout: a key of ``LAYOUTS``.
    """

    pattern: str
    layout: str

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"sharding rule {self.pattern!r}: unknown layout {self.layout!r} (known: {sorted(LAYOUTS)})"
            )

    def matches(self, name: str) -> bool:
        """Whether canonical parameter ``name`` falls under this rule."""
        return _name_pattern(self.pattern).fullmatch(name) is not None


@functools.cache
def _name_pattern(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))


def sharding_table(model_cfg) -> tuple[ShardRule, ...]:
    """The family's table: the config asks its ``ModelSpec`` (``ModelConfig.family()``).

    ``parallel`` only calls the method, so it never imports a model family.
    """
    return model_cfg.family().sharding


def matching_rules(name: str, table) -> list[ShardRule]:
    """Rules of ``table`` that cover ``name`` (exactly one for a well-formed table)."""
    return [rule for rule in table if rule.matches(name)]


def shard_spec_for(name: str, model_cfg) -> ShardSpec:
    """The sharding of canonical parameter ``name`` for this model (layout-independent)."""
    rules = matching_rules(name, sharding_table(model_cfg))
    if len(rules) != 1:
        what = (
            "no sharding rule" if not rules else f"{len(rules)} sharding rules ({[r.pattern for r in rules]})"
        )
        raise KeyError(f"{what} for parameter {name!r}")
    return LAYOUTS[rules[0].layout](name, model_cfg)


# ---------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Piece:
    """One block's contribution to a rank's shard along one axis."""

    block: int  # index of the block in the axis
    start: int  # first row, in padded-full coordinates
    end: int
    local_start: int  # first row in the local shard
    num_real: int  # leading rows that are real (the rest is vocabulary padding)


def local_pieces(axis: Axis, coords) -> list[Piece]:
    """The pieces of each block that the rank at ``coords`` holds along ``axis``, in local order."""
    g, r = coords.size(axis.group), coords.index(axis.group)
    pieces, offset, local = [], 0, 0
    for i, block in enumerate(axis.blocks):
        start, end = block.local_range(g, r)
        num_real = max(0, min(end, block.size) - start)
        pieces.append(Piece(i, offset + start, offset + end, local, num_real))
        offset += block.padded_size(g)
        local += end - start
    return pieces


def _axis_positions(axis: Axis, coords) -> torch.Tensor:
    """Padded-full positions along ``axis.dim`` of this rank's local rows, in local order."""
    return torch.cat([torch.arange(p.start, p.end) for p in local_pieces(axis, coords)])


def _gather(padded: torch.Tensor, spec: ShardSpec, coords) -> torch.Tensor:
    out = padded
    for axis in spec.axes:
        out = out.index_select(axis.dim, _axis_positions(axis, coords).to(out.device))
    return out


def _scatter_(padded: torch.Tensor, axes: tuple[Axis, ...], coords, local: torch.Tensor) -> None:
    """Write ``local`` into its place in ``padded`` (inverse of ``_gather``), one axis at a time."""
    if not axes:
        padded.copy_(local)
        return
    pos = _axis_positions(axes[0], coords).to(padded.device)
    slab = padded.index_select(axes[0].dim, pos)  # a copy: fill it, then write it back
    _scatter_(slab, axes[1:], coords, local)
    padded.index_copy_(axes[0].dim, pos, slab)


def _padding(spec: ShardSpec, tp_like: Mapping[str, int]):
    """Per padded axis: (dim, [(canonical_start, size, padded_size)] per block)."""
    out = []
    for axis in spec.axes:
        g = tp_like[axis.group]
        if any(b.padded_size(g) != b.size for b in axis.blocks):
            starts, off = [], 0
            for b in axis.blocks:
                starts.append((off, b.size, b.padded_size(g)))
                off += b.size
            out.append((axis.dim, starts))
    return out


def _pad(full: torch.Tensor, spec: ShardSpec, sizes: Mapping[str, int]) -> torch.Tensor:
    for dim, blocks in _padding(spec, sizes):
        parts = []
        for start, size, padded in blocks:
            parts.append(full.narrow(dim, start, size))
            shape = list(full.shape)
            shape[dim] = padded - size
            parts.append(full.new_zeros(shape))
        full = torch.cat(parts, dim)
    return full


def _unpad(padded: torch.Tensor, spec: ShardSpec, sizes: Mapping[str, int]) -> torch.Tensor:
    for dim, blocks in _padding(spec, sizes):
        parts, off = [], 0
        for _start, size, pad_size in blocks:
            parts.append(padded.narrow(dim, off, size))
            off += pad_size
        padded = torch.cat(parts, dim)
    return padded


def strip_padding(padded: torch.Tensor, name: str, model_cfg, coords) -> torch.Tensor:
    """The canonical tensor from its padded full form under the layout of ``coords``."""
    return _unpad(padded, shard_spec_for(name, model_cfg), _sizes(coords))


def _sizes(coords) -> dict[str, int]:
    return {g: coords.size(g) for g in ("tp", "ep", "etp")}


def padded_shape(spec: ShardSpec, coords) -> tuple[int, ...]:
    """Full shape after padding for the layout of ``coords``."""
    shape = list(spec.shape)
    for axis in spec.axes:
        shape[axis.dim] = sum(b.padded_size(coords.size(axis.group)) for b in axis.blocks)
    return tuple(shape)


def local_shape(spec: ShardSpec, coords) -> tuple[int, ...]:
    """Shape of the shard held by the rank at ``coords``."""
    shape = list(spec.shape)
    for axis in spec.axes:
        shape[axis.dim] = len(_axis_positions(axis, coords))
    return tuple(shape)


# ---------------------------------------------------------------- public transforms


def shard_tensor(full: torch.Tensor, name: str, model_cfg, coords) -> torch.Tensor:
    """Slice canonical ``full`` into the shard held by the rank at ``coords`` (a ``RankCoords``)."""
    spec = shard_spec_for(name, model_cfg)
    if tuple(full.shape) != spec.shape:
        raise ValueError(f"{name}: expected full shape {spec.shape}, got {tuple(full.shape)}")
    return _gather(_pad(full, spec, _sizes(coords)), spec, coords).contiguous()


def unshard_tensors(
    locals_by_rank: Mapping[int, torch.Tensor],
    name: str,
    model_cfg,
    dims,
    check_replicas: bool = False,
    atol: float = 0.0,
) -> torch.Tensor:
    """Reassemble canonical ``name`` from the shards of some ranks of layout ``dims``.

    Args:
        locals_by_rank: global rank -> local tensor; any subset of ranks that covers the tensor
            (e.g. one pipeline stage's tp x ep ranks); replicas beyond the first are ignored.
        name: canonical parameter name.
        model_cfg: the model config.
        dims: the ``ParallelDims`` the shards were produced under.
        check_replicas: raise if two ranks hold different values for the same element.
        atol: tolerance for ``check_replicas``.

    Returns:
        The unpadded full tensor.
    """
    spec = shard_spec_for(name, model_cfg)
    if not locals_by_rank:
        raise ValueError(f"{name}: no shards given")
    coords0 = dims.coords(next(iter(locals_by_rank)))
    sample = next(iter(locals_by_rank.values()))
    full = sample.new_zeros(padded_shape(spec, coords0))
    seen = torch.zeros(full.shape, dtype=torch.bool)
    for rank, local in locals_by_rank.items():
        coords = dims.coords(rank)
        if tuple(local.shape) != local_shape(spec, coords):
            raise ValueError(
                f"{name}: rank {rank} shard has shape {tuple(local.shape)}, "
                f"expected {local_shape(spec, coords)}"
            )
        if check_replicas:
            old, was = _gather(full, spec, coords), _gather(seen, spec, coords)
            diff = (old - local.to(old.dtype)).abs().masked_fill_(~was, 0.0)
            if diff.numel() and float(diff.max()) > atol:
                raise ValueError(f"{name}: rank {rank} disagrees with another replica")
        _scatter_(full, spec.axes, coords, local.to(full.dtype))
        _scatter_(seen, spec.axes, coords, torch.ones(local.shape, dtype=torch.bool))
    sizes = _sizes(coords0)
    if not bool(_unpad(seen, spec, sizes).all()):
        raise ValueError(f"{name}: the given ranks {sorted(locals_by_rank)} do not cover the full tensor")
    return _unpad(full, spec, sizes)


def replicated_rows(spec: ShardSpec, coords):
    """Local rows of ``spec`` that other ranks of the same group hold too (KV heads with nkv < tp).

    Returns:
        ``(pieces, num_units)`` with ``pieces`` a tuple of ``(local_start, local_end, unit)`` (unit =
        the global unit index, e.g. the KV head), or None when nothing is replicated.
    """
    pieces, units_seen = [], set()
    for axis in spec.axes:
        g, r, local = coords.size(axis.group), coords.index(axis.group), 0
        for block in axis.blocks:
            start, end = block.local_range(g, r)
            if block.replicas(g) > 1:
                if axis.dim != 0:
                    raise NotImplementedError(f"{spec.name}: replicated blocks are supported on dim 0 only")
                pieces.append((local, local + end - start, start // block.unit_size))
                units_seen.add(block.units(g))
            local += end - start
    if not pieces:
        return None
    if len(units_seen) != 1:
        raise NotImplementedError(f"{spec.name}: replicated blocks must have the same number of units")
    return tuple(pieces), units_seen.pop()

"""Layout-independent initial values for parameter shards.

Every element's initial value is a pure function of (seed, canonical name, its index in the
canonical unsharded tensor): a counter-based generator (splitmix64 hash of the index, then
Box-Muller). So a shard can be initialised without the full tensor ever existing, replicas
(replicated params, KV heads with nkv < tp) are identical, and a run starts from exactly the same
weights whatever its (tp, ep, etp) layout, including the single-process plain model.

The standard deviation per name is the family's init rule (``ModelConfig.family().init_std``);
Megatron's, used by every family so far: normal(0, init_std), with ``init_std / sqrt(2 * num_layers)`` for the
output projections (``wo``, ``w2``, ``experts.w2``); norms are ones; vocabulary padding rows are 0.
"""

from __future__ import annotations

import hashlib

import torch

from megatron_lite.parallel.sharding import local_pieces, local_shape, shard_spec_for, strip_padding

_CHUNK = 1 << 22  # elements generated at once (bounds the int64 temporaries)


def _u64(value: int) -> int:
    """A 64-bit constant as the int64 torch stores it (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _u64(0x9E3779B97F4A7C15), _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser; int64 multiplication wraps modulo 2**64 as unsigned arithmetic would."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def counter_normal(index: torch.Tensor, key: int) -> torch.Tensor:
    """Standard normal fp32 values, one per int64 ``index``, a pure function of (index, key).

    One 64-bit hash per element gives two disjoint 24-bit uniforms for Box-Muller (fp32 math;
    the tails are cut at about 5.8 sigma, irrelevant for initialisation).
    """
    bits = _splitmix64(index + key)
    scale = 1.0 / (1 << 24)
    u1 = (_shr(bits, 40) + 1).float() * scale  # (0, 1]: the log is finite
    u2 = ((bits >> 8) & 0xFFFFFF).float() * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)


def _canonical_positions(spec, coords, device) -> list[torch.Tensor]:
    """Per dim of the local shard: canonical index of each local row (-1 for padding rows)."""
    shape = local_shape(spec, coords)
    positions = [torch.arange(n, device=device) for n in shape]
    for axis in spec.axes:
        g = coords.size(axis.group)
        padded_offsets, canonical_offsets, p, c = [], [], 0, 0
        for block in axis.blocks:
            padded_offsets.append(p)
            canonical_offsets.append(c)
            p, c = p + block.padded_size(g), c + block.size
        parts = []
        for piece in local_pieces(axis, coords):
            rows = torch.arange(piece.start, piece.end, device=device)
            rows = rows - padded_offsets[piece.block] + canonical_offsets[piece.block]
            rows[piece.num_real :] = -1
            parts.append(rows)
        positions[axis.dim] = torch.cat(parts)
    return positions


def init_local_tensor(name: str, model_cfg, coords, seed: int, device="cpu") -> torch.Tensor:
    """Initial fp32 values of the shard of ``name`` held at ``coords`` (padding rows included, as 0)."""
    spec = shard_spec_for(name, model_cfg)
    shape = local_shape(spec, coords)
    std = model_cfg.family().init_std(name, model_cfg)  # the family's init rule (ModelSpec)
    if std is None:
        return torch.ones(shape, device=device)
    pos = _canonical_positions(spec, coords, device)
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * spec.shape[d + 1]
    out = torch.empty(shape, device=device)
    key = _key(seed, name)
    rows_per_chunk = max(1, _CHUNK // max(1, out[0].numel()))
    for start in range(0, shape[0], rows_per_chunk):
        index, valid = _linear_index([pos[0][start : start + rows_per_chunk], *pos[1:]], strides)
        out[start : start + rows_per_chunk] = torch.where(valid, counter_normal(index, key) * std, 0.0)
    return out


def _linear_index(pos: list[torch.Tensor], strides: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast per-dim canonical positions into linear indices and a not-padding mask."""
    n = len(pos)
    index = torch.zeros((), dtype=torch.int64, device=pos[0].device)
    valid = torch.ones((), dtype=torch.bool, device=index.device)
    for d, p in enumerate(pos):
        view = [1] * n
        view[d] = -1
        p = p.view(view)
        index = index + p.clamp(min=0) * strides[d]
        valid = valid & (p >= 0)
    return index, valid


def init_full_tensor(name: str, model_cfg, seed: int, device="cpu") -> torch.Tensor:
    """Initial values of the whole canonical (unpadded) tensor: what every layout's shards reassemble to."""
    from megatron_lite.parallel.dims import ParallelDims

    coords = ParallelDims.build(1).coords(0)
    return strip_padding(init_local_tensor(name, model_cfg, coords, seed, device), name, model_cfg, coords)

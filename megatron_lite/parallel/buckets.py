"""The bucket layout of a gradient buffer (``parallel.grad_buffer``): which parameter goes where."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

SHARD_ALIGN = 128  # elements: every shard starts 512-byte aligned (what NCCL likes)


def mb_to_elements(megabytes: float) -> int:
    """fp32 elements in ``megabytes`` MiB (at least 1)."""
    return max(1, int(megabytes * 2**20) // 4)


@dataclass
class Bucket:
    """A contiguous run ``[start, end)`` of a buffer, reduced by one collective.

    ``ranges[i]`` is ``[start, end)`` of ``params[i]`` in buffer coordinates (padding at the end).
    """

    index: int
    start: int
    end: int
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    waiting: int = 0  # parameters whose final gradient of the step has not arrived
    work: object = None  # the async collective's handle, None before launch / on one rank
    result: tuple | None = None  # (low-precision copy, fp32 target) to write back after ``work``
    gather: object = None  # the async parameter all-gather's handle (``overlap_param_gather``)
    launched: bool = False
    in_backward: bool = False  # launched by a hook (before finish_grad_sync)
    early: bool = False  # launched while a later bucket still waited for gradients (overlap)


def layout_buckets(named_params, bucket_elems, pad_multiple, own_bucket, chunk_of) -> list[Bucket]:
    """Cut ``named_params`` (buffer order) into buckets (rules: ``parallel.grad_buffer``'s docstring).

    Args:
        named_params: ``(name, param)`` in buffer order.
        bucket_elems: close a bucket once it holds at least this many elements.
        pad_multiple: every bucket is padded to a multiple of this many elements.
        own_bucket: names that get a bucket of their own.
        chunk_of: ``id(param) -> pipeline chunk`` or None; a bucket never spans two chunks.
    """
    buckets: list[Bucket] = []
    offset, current, prev_chunk, prev_own = 0, None, None, False
    chunk_of = chunk_of or {}
    for name, param in named_params:
        chunk, own = chunk_of.get(id(param)), name in own_bucket
        full = current is not None and current.end - current.start >= bucket_elems
        if current is None or full or own or prev_own or chunk != prev_chunk:
            if current is not None:
                offset = _close(current, pad_multiple)
            current = Bucket(index=len(buckets), start=offset, end=offset)
            buckets.append(current)
        n = param.numel()
        current.params.append(param)
        current.names.append(name)
        current.ranges.append((current.end, current.end + n))
        current.end += n
        prev_chunk, prev_own = chunk, own
    _close(current, pad_multiple)
    return buckets


def _close(bucket: Bucket, pad_multiple: int) -> int:
    size = bucket.end - bucket.start
    bucket.end = bucket.start + -(-size // pad_multiple) * pad_multiple
    return bucket.end

"""Batch samplers over sample indices, Megatron style (deterministic, resumable)."""

from __future__ import annotations

from collections.abc import Iterator


class MegatronPretrainingSampler:
    """Yields this data-parallel rank's micro-batch of sample indices, in order.

    Global batch ``k`` (after ``consumed_samples``) covers indices
    ``consumed + k * mbs * dp ... + mbs * dp``; rank ``r`` gets the ``r``-th slice of ``mbs``.
    The dataset shuffles, so the sampler walks indices in order and resuming at a consumed count
    continues exactly where an uninterrupted run would be.

    Args:
        total_samples: indices ``0 .. total_samples - 1`` are drawn.
        consumed_samples: samples already consumed by all ranks (resume point).
        micro_batch_size: indices per yielded list.
        data_parallel_rank: this rank in the data-parallel group.
        data_parallel_size: ranks in the data-parallel group.
        drop_last: drop a final partial global batch (else each rank gets its share of it).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must lie in [0, total_samples={total_samples}]"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank ({data_parallel_rank}) outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.micro_batch_size * self.data_parallel_size
        offset = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + global_batch <= self.total_samples:
            yield list(range(start + offset, start + offset + self.micro_batch_size))
            start += global_batch
        if start < self.total_samples and not self.drop_last:
            end = self.total_samples
            yield list(range(min(start + offset, end), min(start + offset + self.micro_batch_size, end)))

"""``build_gpt_datasets``: the trainer's entry point from data paths to train/valid/test datasets."""

from __future__ import annotations

import numpy as np

from megatron_lite.data.blended_dataset import BlendedDataset, component_sizes, parse_blend
from megatron_lite.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDataset,
    loss_mask_prefix,
    parse_split,
    split_ranges,
)
from megatron_lite.data.index_cache import default_cache_dir
from megatron_lite.data.indexed_dataset import DatasetError, IndexedDataset


def _check_args(seq_length: int, num_samples) -> tuple[int, int, int]:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    counts = tuple(int(n) for n in num_samples)
    if len(counts) != 3 or min(counts) < 0:
        raise ValueError(
            f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}"
        )
    return counts


def _build_split(
    prefixes, weights, ranges, split_index, size, seq_length, seed, cache_dir, group, force_mask
):
    """One split: a GPTDataset for one prefix, a BlendedDataset for several; None when empty."""
    name = SPLIT_NAMES[split_index]
    live = [(p, w, r[split_index]) for p, w, r in zip(prefixes, weights, ranges) if w > 0]
    live = [(p, w, r) for p, w, r in live if r[1] > r[0]]
    if size == 0 or not live:
        return None

    def component(prefix, rng, n):
        docs = np.arange(rng[0], rng[1], dtype=np.int64)
        return GPTDataset(prefix, docs, seq_length, n, seed, cache_dir, name, group, force_mask)

    if len(prefixes) == 1:
        prefix, _, rng = live[0]
        return component(prefix, rng, size)
    sizes = component_sizes([w for _, w, _ in live], size)
    datasets = [component(p, rng, n) for (p, _, rng), n in zip(live, sizes)]
    return BlendedDataset(datasets, [w for _, w, _ in live], size, cache_dir, group)


def build_gpt_datasets(
    paths: list[str],
    split: str,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str | None = None,
    group=None,
):
    """Train, valid and test datasets of ``seq_length + 1``-token samples.

    Args:
        paths: one prefix, or weights and prefixes ``["0.7", "prefA", "0.3", "prefB"]``; several
            prefixes without weights are weighted by their token counts.
        split: document split of every prefix, e.g. ``"969,30,1"``.
        seq_length: model sequence length.
        num_samples: samples wanted for (train, valid, test); 0 gives None for that split.
        seed: shuffling seed.
        cache_dir: where index arrays are cached (default ``<dir of first prefix>/cache``).
        group: torch.distributed group whose rank 0 builds the cache (default: the world).

    Returns:
        (train, valid, test), each a dataset of dicts ``{"tokens": int64 [seq_length + 1]}``
        plus ``"loss_mask": float32 [seq_length + 1]`` when the data stores loss masks, or None.
    """
    counts = _check_args(seq_length, num_samples)
    prefixes, weights = parse_blend([paths] if isinstance(paths, str) else list(paths))
    indexed = [IndexedDataset(p) for p in prefixes]
    if weights is None:
        weights = [float(d.num_tokens) for d in indexed] if len(prefixes) > 1 else [1.0]
        if sum(weights) <= 0:
            raise DatasetError(f"datasets {prefixes} hold no tokens")
    split_weights = parse_split(split)
    ranges = [split_ranges(split_weights, len(d)) for d in indexed]
    force_mask = any(loss_mask_prefix(p) is not None for p in prefixes)
    if cache_dir is None:
        cache_dir = default_cache_dir(prefixes[0])
    return tuple(
        _build_split(prefixes, weights, ranges, i, counts[i], seq_length, seed, cache_dir, group, force_mask)
        for i in range(3)
    )

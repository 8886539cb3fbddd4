"""Numpy references of the C++ dataset index builders in ``csrc/dataset_helpers.cpp``.

Each function returns exactly what its C++ twin returns (same values, same dtype); tests check
this on random inputs. They are written for clarity, not speed: use the C++ versions
(``megatron_lite.data.helpers``) for real datasets.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    """splitmix64 finalizer on python ints (masked) or uint64 arrays (wrapping)."""
    if isinstance(z, np.ndarray):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def swap_targets(n: int, seed: int, stream: int) -> np.ndarray:
    """Fisher-Yates partners: entry ``i`` (1 <= i < n) is the ``j`` swapped with ``i``. uint64 [n]."""
    if n >= 1 << 32:
        raise ValueError("shuffle: at most 2^32 - 1 elements")
    base = _mix64((seed & _MASK64) ^ ((stream * _GOLDEN) & _MASK64))
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = _mix64(np.uint64(base) + i * np.uint64(_GOLDEN))
    return ((keys >> np.uint64(32)) * (i + np.uint64(1))) >> np.uint64(32)


def shuffle_inplace(a: np.ndarray, seed: int, stream: int) -> None:
    """Shuffle ``a`` in place exactly like the C++ ``shuffle_inplace``."""
    j = swap_targets(len(a), seed, stream).tolist()
    for i in range(len(a) - 1, 0, -1):
        k = j[i]
        a[i], a[k] = a[k], a[i]


def build_document_index(documents: np.ndarray, num_epochs: int, seed: int, separate_final_epoch: bool):
    """``documents`` [n] tiled ``num_epochs`` times and shuffled. Returns int32 [n * num_epochs]."""
    docs = np.asarray(documents, dtype=np.int64)
    out = np.tile(docs, num_epochs).astype(np.int32)
    n = len(docs)
    if separate_final_epoch and num_epochs > 1:
        head = out[: n * (num_epochs - 1)]
        tail = out[n * (num_epochs - 1) :]
        shuffle_inplace(head, seed, 0)
        shuffle_inplace(tail, seed, 1)
    else:
        shuffle_inplace(out, seed, 0)
    return out


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int):
    """Sample boundaries as (document index position, offset). Returns int64 [num_samples + 1, 2].

    Sample ``k`` covers global token positions ``k * seq_length .. (k + 1) * seq_length`` of the
    concatenated documents; a boundary sits in the document containing that token (row 0 is
    ``(0, 0)`` even when the first document is empty).
    """
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index, dtype=np.int64)]
    ends = np.cumsum(lengths)  # [n_doc] exclusive end of each document in the stream
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if num_samples > 0 and (len(ends) == 0 or positions[-1] >= ends[-1]):
        raise ValueError("build_sample_index: document index has too few tokens")
    doc_pos = np.searchsorted(ends, positions, side="right")
    starts = ends - lengths
    out = np.stack([doc_pos, positions - starts[np.minimum(doc_pos, len(ends) - 1)]], axis=1)
    out[0] = (0, 0)
    return out.astype(np.int64)


def build_shuffle_index(num_samples: int, total_size: int, seed: int) -> np.ndarray:
    """``arange(num_samples)`` shuffled, then ``arange(num_samples, total_size)`` shuffled. int64."""
    head = np.arange(num_samples, dtype=np.int64)
    tail = np.arange(num_samples, total_size, dtype=np.int64)
    shuffle_inplace(head, seed, 2)
    shuffle_inplace(tail, seed, 3)
    return np.concatenate([head, tail])


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend: each step picks the dataset lagging its weight most.

    Returns:
        (dataset_index int16 [size], dataset_sample_index int64 [size]).
    """
    w = np.asarray(weights, dtype=np.float64)
    picked = np.zeros(len(w), dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        best = int(np.argmax(w * max(float(i), 1.0) - picked))
        dataset_index[i] = best
        sample_index[i] = picked[best]
        picked[best] += 1
    return dataset_index, sample_index


def ffd_pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """First-fit decreasing bin of every item (bins numbered in opening order). int64 [n]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > capacity):
        raise ValueError(f"ffd_pack: item lengths must lie in [0, capacity={capacity}]")
    order = np.argsort(-lengths, kind="stable")
    room = np.full(len(lengths), capacity, dtype=np.int64)
    bins = np.zeros(len(lengths), dtype=np.int64)
    for item in order:
        b = int(np.argmax(room >= lengths[item]))
        bins[item] = b
        room[b] -= lengths[item]
    return bins

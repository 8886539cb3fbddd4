"""Python face of the C++ dataset index builders (``megatron_lite._C``), numpy fallback.

The compiled helpers are used when the extension is built; otherwise the numpy references in
``index_reference`` run instead (identical output, much slower) after a one-time warning.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from megatron_lite.data import index_reference as ref

_FUNCTIONS = (
    "build_document_index",
    "build_sample_index",
    "build_shuffle_index",
    "build_blending_indices",
    "ffd_pack",
)


@functools.lru_cache(maxsize=1)
def compiled_helpers():
    """The ``megatron_lite._C`` module when it has the dataset helpers, else None."""
    try:
        import torch  # noqa: F401  - loads libc10 for the extension

        from megatron_lite import _C
    except ImportError:
        return None
    return _C if all(hasattr(_C, name) for name in _FUNCTIONS) else None


def _impl(name: str):
    mod = compiled_helpers()
    if mod is None:
        warnings.warn(f"megatron_lite._C dataset helpers missing: using the slow numpy {name}", stacklevel=3)
        return getattr(ref, name)
    return getattr(mod, name)


def build_document_index(documents: np.ndarray, num_epochs: int, seed: int, separate_final_epoch: bool):
    """Document ids tiled ``num_epochs`` times and shuffled. Returns int32 [n * num_epochs]."""
    docs = np.ascontiguousarray(documents, dtype=np.int64)
    return _impl("build_document_index")(docs, int(num_epochs), int(seed), bool(separate_final_epoch))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int):
    """Sample boundaries ``(position in document_index, offset)``. Returns int64 [num_samples + 1, 2]."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int32)
    return _impl("build_sample_index")(sizes, document_index, int(seq_length), int(num_samples))


def build_shuffle_index(num_samples: int, total_size: int, seed: int) -> np.ndarray:
    """Shuffled sample order (first ``num_samples`` and the rest shuffled apart). int64 [total_size]."""
    return _impl("build_shuffle_index")(int(num_samples), int(total_size), int(seed))


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of datasets. Returns (dataset index int16 [size], sample index int64 [size])."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    dataset_index, sample_index = _impl("build_blending_indices")(w, int(size))
    return np.asarray(dataset_index), np.asarray(sample_index)


def ffd_pack(lengths, capacity: int) -> np.ndarray:
    """First-fit-decreasing bin of every item. int64 [n]."""
    return _impl("ffd_pack")(np.ascontiguousarray(lengths, dtype=np.int64), int(capacity))

"""Data pipeline: indexed datasets (.bin/.idx), tokenizers, GPT/blended datasets, batching.

Public entry points::

    from megatron_lite.data import build_gpt_datasets, MegatronPretrainingSampler, make_batch

Names are imported lazily so that preprocessing (no torch needed) starts fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "batching",
    "collate_samples": "batching",
    "make_batch": "batching",
    "BlendedDataset": "blended_dataset",
    "build_gpt_datasets": "builder",
    "GPTDataset": "gpt_dataset",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "optimal_dtype": "indexed_dataset",
    "MegatronPretrainingSampler": "sampler",
    "build_tokenizer": "tokenizers",
    "bundled_mistral_tokenizer_path": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_lite.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"megatron_lite.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

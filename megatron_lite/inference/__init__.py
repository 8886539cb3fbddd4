"""Generation with a KV cache (rolling buffer for sliding-window attention).

Public API: ``generate_batch`` (ragged prompts, stop strings, per-row limits) and
``load_model_for_inference`` (HF directory or training checkpoint, optionally tensor-parallel).
"""

from megatron_lite.inference.batch import generate_batch
from megatron_lite.inference.generation import generate, prefill, sample_next
from megatron_lite.inference.kv_cache import KVCache
from megatron_lite.inference.loader import (
    UnsupportedCheckpointError,
    checkpoint_kind,
    load_errors,
    load_model_for_inference,
)

__all__ = [
    "KVCache",
    "UnsupportedCheckpointError",
    "checkpoint_kind",
    "generate",
    "generate_batch",
    "load_errors",
    "load_model_for_inference",
    "prefill",
    "sample_next",
]

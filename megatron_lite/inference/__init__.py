"""Generation with a KV cache (rolling buffer for sliding-window attention)."""

from megatron_lite.inference.generation import generate, prefill, sample_next
from megatron_lite.inference.kv_cache import KVCache
from megatron_lite.inference.loader import (
    UnsupportedCheckpointError,
    checkpoint_kind,
    load_model_for_inference,
)

__all__ = [
    "KVCache",
    "UnsupportedCheckpointError",
    "checkpoint_kind",
    "generate",
    "load_model_for_inference",
    "prefill",
    "sample_next",
]

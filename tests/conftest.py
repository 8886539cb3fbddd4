"""Fixtures shared by the test files: tiny model configs and the op-backend reset.

``tiny_model_config(arch, **overrides)`` is also importable by module-level helpers (distributed
test bodies cannot take fixtures): ``from conftest import tiny_model_config``.
"""

from __future__ import annotations

import pytest

from megatron_lite.config import ModelConfig

# Small enough for CPU tests in a second; GQA (4 query, 2 KV heads) and 4 experts for MoE families.
TINY_MODEL = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    top_k=2,
)


def tiny_model_config(arch: str = "mistral", **overrides) -> ModelConfig:
    """A validated tiny ``ModelConfig`` of family ``arch`` (``overrides`` replace any field)."""
    cfg = ModelConfig(arch=arch, **{**TINY_MODEL, **overrides})
    cfg.validate()
    return cfg


@pytest.fixture
def tiny_config():
    """The ``tiny_model_config`` factory, as a fixture."""
    return tiny_model_config


@pytest.fixture
def auto_op_backend():
    """Each test starts and ends with the ops' ``auto`` backend and fresh fallback warnings."""
    from megatron_lite import ops
    from megatron_lite.ops import _backend

    ops.set_backend("auto")
    _backend.reset_warnings()
    yield
    ops.set_backend("auto")

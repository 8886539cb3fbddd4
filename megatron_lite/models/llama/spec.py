"""Llama's ``ModelSpec``: Mistral's dense sharding and FLOPs, no sliding window, Llama 3 RoPE scaling."""

from __future__ import annotations

from megatron_lite.config import ConfigError
from megatron_lite.models.common.transformer import init_std_for
from megatron_lite.models.llama.model import LlamaModel
from megatron_lite.models.mistral.spec import SHARDING, dense_layer_params
from megatron_lite.models.registry import ModelSpec


def validate(cfg) -> None:
    """Llama attends to the whole sequence."""
    if cfg.sliding_window is not None:
        raise ConfigError(f"model.sliding_window ({cfg.sliding_window}) must be null for model.arch llama")


SPEC = ModelSpec(
    name="llama",
    description="dense decoder (LlamaForCausalLM, Llama 2 and 3 incl. llama3 RoPE scaling)",
    model_cls=LlamaModel,
    sharding=SHARDING,
    hf_adapter="megatron_lite.models.llama.hf_adapter",
    init_std=init_std_for,
    layer_params=dense_layer_params,
    validate=validate,
    rope_scaling=("llama3",),
)

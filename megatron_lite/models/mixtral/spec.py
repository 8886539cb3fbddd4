"""Mixtral's ``ModelSpec``: Mistral's attention with top-k routed SwiGLU experts in every layer."""

from __future__ import annotations

from megatron_lite.config import ConfigError
from megatron_lite.models.common.transformer import init_std_for
from megatron_lite.models.mistral.spec import COMMON_SHARDING, attention_params
from megatron_lite.models.mixtral.model import MixtralModel
from megatron_lite.models.registry import ModelSpec
from megatron_lite.parallel.sharding import ShardRule

SHARDING: tuple[ShardRule, ...] = COMMON_SHARDING + (
    ShardRule("layers.*.feed_forward.router.weight", "router"),
    ShardRule("layers.*.feed_forward.experts.w13", "expert_w13"),
    ShardRule("layers.*.feed_forward.experts.w2", "expert_w2"),
)


def moe_layer_params(cfg, active_only: bool = True) -> int:
    """Parameters of one block; experts: only the ``top_k`` active ones if ``active_only``.

    The router counts in full (every token goes through it).
    """
    experts = cfg.top_k if active_only else cfg.num_experts
    ffn = experts * 3 * cfg.hidden_size * cfg.intermediate_size + cfg.hidden_size * cfg.num_experts
    return attention_params(cfg) + ffn + 2 * cfg.hidden_size


def validate(cfg) -> None:
    """Expert count and routing fan-out."""
    n = cfg.num_experts
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"model.num_experts ({n!r}) must be a positive number")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ConfigError(f"model.top_k ({cfg.top_k}) must be in [1, model.num_experts ({cfg.num_experts})]")


SPEC = ModelSpec(
    name="mixtral",
    description="sparse mixture-of-experts decoder (MixtralForCausalLM)",
    model_cls=MixtralModel,
    sharding=SHARDING,
    hf_adapter="megatron_lite.models.mixtral.hf_adapter",
    init_std=init_std_for,
    layer_params=moe_layer_params,
    is_moe=True,
    validate=validate,
)

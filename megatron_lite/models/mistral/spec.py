"""Mistral's ``ModelSpec``: the dense decoder, its sharding table, FLOPs formula and init rule."""

from __future__ import annotations

from megatron_lite.models.common.transformer import init_std_for
from megatron_lite.models.mistral.model import MistralModel
from megatron_lite.models.registry import ModelSpec
from megatron_lite.parallel.sharding import ShardRule

# Parameters shared by every decoder family: embedding, attention, norms, output layer.
COMMON_SHARDING: tuple[ShardRule, ...] = (
    ShardRule("tok_embeddings.weight", "vocab_embedding"),
    ShardRule("layers.*.attention_norm.weight", "norm"),
    ShardRule("layers.*.attention.wqkv.weight", "fused_qkv"),
    ShardRule("layers.*.attention.wo.weight", "row_heads"),
    ShardRule("layers.*.ffn_norm.weight", "norm"),
    ShardRule("norm.weight", "norm"),
    ShardRule("output.weight", "vocab_output"),
)

# The dense SwiGLU feed-forward.
SHARDING: tuple[ShardRule, ...] = COMMON_SHARDING + (
    ShardRule("layers.*.feed_forward.w13.weight", "fused_gate_up"),
    ShardRule("layers.*.feed_forward.w2.weight", "row"),
)


def attention_params(cfg) -> int:
    """Parameters of one attention layer (fused QKV and output projection)."""
    h, hd = cfg.hidden_size, cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return h * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_attention_heads * hd * h


def dense_layer_params(cfg, active_only: bool = True) -> int:
    """Parameters of one dense block: attention, SwiGLU (gate, up, down), two RMSNorm weights."""
    return attention_params(cfg) + 3 * cfg.hidden_size * cfg.intermediate_size + 2 * cfg.hidden_size


SPEC = ModelSpec(
    name="mistral",
    description="dense decoder (MistralForCausalLM: GQA, RoPE, RMSNorm, SwiGLU, sliding window)",
    model_cls=MistralModel,
    sharding=SHARDING,
    hf_adapter="megatron_lite.models.mistral.hf_adapter",
    init_std=init_std_for,
    layer_params=dense_layer_params,
)

"""Hugging Face ``MistralForCausalLM`` <-> canonical names, as data.

Each ``KeyRule`` says which on-disk HF tensors make one canonical parameter. Several HF parts are
concatenated along dim 0 in the listed order (q/k/v -> ``wqkv``, gate/up -> ``w13``). Shapes are
written with symbols resolved from the config by ``megatron_lite.models.hf_io.shape_symbols``:
``v`` vocab, ``h`` hidden, ``q`` heads * head_dim, ``kv`` kv heads * head_dim, ``f`` intermediate,
``E`` experts. ``{i}`` is the layer index (``{e}`` the expert index in Mixtral's rules).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRule:
    """One canonical parameter and the HF tensors it is made of.

    Attributes:
        canonical: canonical name pattern (``{i}``: layer index).
        hf: ``(hf_name_pattern, shape_symbols)`` per part, concatenated along dim 0 in this order.
        per_expert: the parts exist once per expert (``{e}``); the canonical tensor stacks the
            per-expert concatenations along a new leading dim ``[E, ...]``.
        untied_only: only present when the output layer is not tied to the embedding.
    """

    canonical: str
    hf: tuple[tuple[str, tuple[str, ...]], ...]
    per_expert: bool = False
    untied_only: bool = False

    @property
    def per_layer(self) -> bool:
        """Whether the name contains the layer index."""
        return "{i}" in self.canonical


ARCHITECTURE = "MistralForCausalLM"
MODEL_TYPE = "mistral"

_ATTN = "model.layers.{i}.self_attn"

# Rules shared with Mixtral: embedding, attention, norms, output.
COMMON_RULES: tuple[KeyRule, ...] = (
    KeyRule("tok_embeddings.weight", (("model.embed_tokens.weight", ("v", "h")),)),
    KeyRule("layers.{i}.attention_norm.weight", (("model.layers.{i}.input_layernorm.weight", ("h",)),)),
    KeyRule(
        "layers.{i}.attention.wqkv.weight",
        (
            (f"{_ATTN}.q_proj.weight", ("q", "h")),
            (f"{_ATTN}.k_proj.weight", ("kv", "h")),
            (f"{_ATTN}.v_proj.weight", ("kv", "h")),
        ),
    ),
    KeyRule("layers.{i}.attention.wo.weight", ((f"{_ATTN}.o_proj.weight", ("h", "q")),)),
    KeyRule("layers.{i}.ffn_norm.weight", (("model.layers.{i}.post_attention_layernorm.weight", ("h",)),)),
    KeyRule("norm.weight", (("model.norm.weight", ("h",)),)),
    KeyRule("output.weight", (("lm_head.weight", ("v", "h")),), untied_only=True),
)

KEY_RULES: tuple[KeyRule, ...] = COMMON_RULES + (
    KeyRule(
        "layers.{i}.feed_forward.w13.weight",
        (
            ("model.layers.{i}.mlp.gate_proj.weight", ("f", "h")),
            ("model.layers.{i}.mlp.up_proj.weight", ("f", "h")),
        ),
    ),
    KeyRule("layers.{i}.feed_forward.w2.weight", (("model.layers.{i}.mlp.down_proj.weight", ("h", "f")),)),
)

# config.json key <-> ModelConfig field, copied as is (None allowed where the field allows it).
CONFIG_KEYS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_kv_heads"),
    ("head_dim", "head_dim"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("rms_norm_eps", "rms_norm_eps"),
    ("sliding_window", "sliding_window"),
    ("tie_word_embeddings", "tie_embeddings"),
    ("initializer_range", "init_std"),
)

# Values transformers assumes when a key is absent from config.json (MistralConfig defaults).
HF_DEFAULTS: dict[str, object] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: same as num_attention_heads
    "head_dim": None,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-6,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
}

# Fixed entries written to config.json.
HF_EXTRA: dict[str, object] = {"hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True}

# HF tensors that carry no weights (old checkpoints stored the rotary table).
IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)

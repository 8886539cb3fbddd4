"""Hugging Face ``MixtralForCausalLM`` <-> canonical names, as data.

The on-disk layout is the classic one that published Mixtral checkpoints use and that
transformers 5 ``save_pretrained`` still writes (it fuses experts only in memory):
``block_sparse_moe.experts.{e}.w1`` (gate), ``.w3`` (up), ``.w2`` (down), ``block_sparse_moe.gate``
(router). Canonical ``experts.w13`` ``[E, 2F, H]`` is ``stack_e(cat(w1_e, w3_e))``, ``experts.w2``
``[E, H, F]`` is ``stack_e(w2_e)``. Symbols: see ``megatron_lite.models.mistral.hf_adapter``.
"""

from __future__ import annotations

from megatron_lite.models.mistral.hf_adapter import COMMON_RULES, IGNORED_SUFFIXES, KeyRule
from megatron_lite.models.mistral.hf_adapter import CONFIG_KEYS as _MISTRAL_CONFIG_KEYS
from megatron_lite.models.mistral.hf_adapter import HF_DEFAULTS as _MISTRAL_DEFAULTS

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"

_MOE = "model.layers.{i}.block_sparse_moe"

KEY_RULES: tuple[KeyRule, ...] = COMMON_RULES + (
    KeyRule("layers.{i}.feed_forward.router.weight", ((f"{_MOE}.gate.weight", ("E", "h")),)),
    KeyRule(
        "layers.{i}.feed_forward.experts.w13",
        (
            (f"{_MOE}.experts.{{e}}.w1.weight", ("f", "h")),
            (f"{_MOE}.experts.{{e}}.w3.weight", ("f", "h")),
        ),
        per_expert=True,
    ),
    KeyRule(
        "layers.{i}.feed_forward.experts.w2",
        ((f"{_MOE}.experts.{{e}}.w2.weight", ("h", "f")),),
        per_expert=True,
    ),
)

CONFIG_KEYS: tuple[tuple[str, str], ...] = _MISTRAL_CONFIG_KEYS + (
    ("num_local_experts", "num_experts"),
    ("num_experts_per_tok", "top_k"),
    ("router_aux_loss_coef", "aux_loss_coeff"),
)

# MixtralConfig defaults where they differ from Mistral's.
HF_DEFAULTS: dict[str, object] = {
    **_MISTRAL_DEFAULTS,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "rope_theta": 1e6,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}

HF_EXTRA: dict[str, object] = {
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "use_cache": True,
    "output_router_logits": False,
    "router_jitter_noise": 0.0,
}

__all__ = [
    "ARCHITECTURE",
    "CONFIG_KEYS",
    "HF_DEFAULTS",
    "HF_EXTRA",
    "IGNORED_SUFFIXES",
    "KEY_RULES",
    "MODEL_TYPE",
    "KeyRule",
]

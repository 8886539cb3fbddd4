"""Hugging Face ``LlamaForCausalLM`` <-> canonical names, as data (Llama 2 and Llama 3).

The tensor names are Mistral's (same decoder). The config differs: no sliding window, biases
must be off, and RoPE may carry Llama 3's scaling (``rope_parameters`` in transformers 5,
``rope_scaling`` in 4.x). Symbols: see ``megatron_lite.models.mistral.hf_adapter``.
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_lite.models.hf_files import HFCheckpointError
from megatron_lite.models.mistral.hf_adapter import CONFIG_KEYS as _MISTRAL_CONFIG_KEYS
from megatron_lite.models.mistral.hf_adapter import IGNORED_SUFFIXES, KEY_RULES, KeyRule

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"

CONFIG_KEYS: tuple[tuple[str, str], ...] = tuple(k for k in _MISTRAL_CONFIG_KEYS if k[0] != "sliding_window")

# LlamaConfig defaults (transformers 5).
HF_DEFAULTS: dict[str, object] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
}

HF_EXTRA: dict[str, object] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "use_cache": True,
}

# HF rope keys of the "llama3" type <-> ModelConfig fields.
_LLAMA3_KEYS = (
    ("factor", "rope_scaling_factor"),
    ("low_freq_factor", "rope_low_freq_factor"),
    ("high_freq_factor", "rope_high_freq_factor"),
    ("original_max_position_embeddings", "rope_original_max_position_embeddings"),
)


def rope_from_hf(hf: Mapping, where: str) -> dict[str, object]:
    """ModelConfig RoPE fields (``rope_theta``, ``rope_scaling``, ...) from a Llama ``config.json``.

    Also refuses the features this decoder does not have (biases, tensor-parallel pretraining_tp).
    """
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFCheckpointError(f"{where}: {key} true is not supported (no biases in this decoder)")
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise HFCheckpointError(f"{where}: rope_theta ({theta!r}) must be a positive number")
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, object] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise HFCheckpointError(f"{where}: rope scaling type {kind!r} is not supported (only llama3)")
    out["rope_scaling"] = "llama3"
    for key, field in _LLAMA3_KEYS:
        if key not in params:
            raise HFCheckpointError(f"{where}: llama3 rope scaling lacks {key}")
        out[field] = params[key]
    return out


def rope_to_hf(cfg) -> dict[str, object]:
    """The config.json RoPE keys of ``cfg`` (transformers 5 ``rope_parameters`` and 4.x names)."""
    params: dict[str, object] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    out: dict[str, object] = {"rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling == "llama3":
        params["rope_type"] = "llama3"
        params.update({key: getattr(cfg, field) for key, field in _LLAMA3_KEYS})
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    out["rope_parameters"] = params
    return out


__all__ = [
    "ARCHITECTURE",
    "CONFIG_KEYS",
    "HF_DEFAULTS",
    "HF_EXTRA",
    "IGNORED_SUFFIXES",
    "KEY_RULES",
    "MODEL_TYPE",
    "KeyRule",
    "rope_from_hf",
    "rope_to_hf",
]

"""One ``ModelSpec`` per model family: the only place that knows which families exist.

Everything that depends on the family reads the spec of ``ModelConfig.arch`` (through
``ModelConfig.family()`` or ``get_spec``): config validation, ``build_model``, ``parallelize``
(the plan is derived from ``spec.sharding``), checkpoint sharding and resharding, Hugging Face
load/save and conversion (``spec.adapter()``), initialisation (``spec.init_std``) and MFU
(``spec.layer_params``). Adding a family means one directory under ``models/`` with its spec
and one line in ``_FAMILIES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from megatron_lite.parallel.sharding import ShardRule


@dataclass(frozen=True)
class ModelSpec:
    """Everything the framework needs to know about one model family.

    Attributes:
        name: the ``model.arch`` value.
        description: one line for error messages and ``--help``.
        model_cls: the ``Transformer`` subclass; called as ``model_cls(cfg, layer_ids=...,
            pre_process=..., post_process=..., dtype=...)``.
        sharding: the sharding table: for every canonical parameter, how it is split.
        hf_adapter: module holding the Hugging Face key map and config translation
            (``ARCHITECTURE``, ``MODEL_TYPE``, ``KEY_RULES``, ``CONFIG_KEYS``, ``HF_DEFAULTS``,
            ``HF_EXTRA``, ``IGNORED_SUFFIXES``; optional ``rope_from_hf`` / ``rope_to_hf``).
        init_std: ``(canonical name, cfg) -> std`` (None: ones, for norm weights).
        layer_params: ``(cfg, active_only) -> parameters of one block`` (the FLOPs formula's N).
        is_moe: the feed-forward layers are mixtures of experts.
        validate: family-specific config checks, raising ``ConfigError`` (after the common ones).
        rope_scaling: ``model.rope_scaling`` values the family supports (None is always allowed).
    """

    name: str
    description: str
    model_cls: type
    sharding: tuple[ShardRule, ...]
    hf_adapter: str
    init_std: Callable
    layer_params: Callable
    is_moe: bool = False
    validate: Callable | None = None
    rope_scaling: tuple[str, ...] = ()

    def adapter(self) -> ModuleType:
        """The Hugging Face adapter module."""
        return importlib.import_module(self.hf_adapter)

    def flops_params(self, cfg) -> int:
        """Non-embedding parameters plus the output layer, active experts only (the 6N of 6ND)."""
        output = cfg.hidden_size + cfg.vocab_size * cfg.hidden_size  # final norm + output layer
        return cfg.num_layers * self.layer_params(cfg, True) + output


# model.arch -> module defining ``SPEC``. The only list of families in the code base.
_FAMILIES = {
    "mistral": "megatron_lite.models.mistral.spec",
    "mixtral": "megatron_lite.models.mixtral.spec",
    "llama": "megatron_lite.models.llama.spec",
}


def names() -> tuple[str, ...]:
    """The registered ``model.arch`` values."""
    return tuple(_FAMILIES)


def get_spec(arch: str) -> ModelSpec:
    """The spec of ``arch``.

    Raises:
        ConfigError: ``arch`` is not registered (the message lists the known families).
    """
    if arch not in _FAMILIES:
        from megatron_lite.config import ConfigError

        raise ConfigError(f"model.arch ({arch!r}) must be one of {', '.join(_FAMILIES)}")
    spec = importlib.import_module(_FAMILIES[arch]).SPEC
    assert spec.name == arch, (spec.name, arch)
    return spec


def all_specs() -> list[ModelSpec]:
    """Every registered spec, in registration order."""
    return [get_spec(name) for name in _FAMILIES]


def arch_for_hf(architecture: str | None, model_type: str | None = None) -> str | None:
    """The ``model.arch`` whose adapter reads HF ``architectures[0]`` (or ``model_type``), or None."""
    for spec in all_specs():
        ad = spec.adapter()
        if architecture == ad.ARCHITECTURE or (architecture is None and model_type == ad.MODEL_TYPE):
            return spec.name
    return None


def hf_architectures() -> list[str]:
    """HF ``architectures`` names of every registered family."""
    return [spec.adapter().ARCHITECTURE for spec in all_specs()]

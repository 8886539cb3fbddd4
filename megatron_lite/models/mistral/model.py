"""Mistral: the dense decoder (GQA, RoPE, RMSNorm, SwiGLU, optional sliding window)."""

from megatron_lite.config import ModelConfig
from megatron_lite.models.common.transformer import Transformer


class MistralModel(Transformer):
    """Dense decoder; ``cfg.arch`` must be ``mistral``."""

    def __init__(self, cfg: ModelConfig, **kwargs):
        if cfg.arch != "mistral":
            raise ValueError(f"MistralModel needs model.arch 'mistral', got {cfg.arch!r}")
        super().__init__(cfg, **kwargs)

"""Mixtral: the Mistral decoder with top-k routed SwiGLU experts in every layer."""

from megatron_lite.config import ModelConfig
from megatron_lite.models.common.transformer import Transformer


class MixtralModel(Transformer):
    """Sparse decoder; ``cfg.arch`` must be ``mixtral``."""

    def __init__(self, cfg: ModelConfig, **kwargs):
        if cfg.arch != "mixtral":
            raise ValueError(f"MixtralModel needs model.arch 'mixtral', got {cfg.arch!r}")
        super().__init__(cfg, **kwargs)

"""Llama (2 and 3): the dense decoder without a sliding window, optionally with Llama 3 RoPE scaling."""

from megatron_lite.config import ModelConfig
from megatron_lite.models.common.transformer import Transformer
from megatron_lite.models.llama.rope import Llama3RotaryEmbedding


class LlamaModel(Transformer):
    """Dense decoder; ``cfg.arch`` must be ``llama``."""

    def __init__(self, cfg: ModelConfig, **kwargs):
        if cfg.arch != "llama":
            raise ValueError(f"LlamaModel needs model.arch 'llama', got {cfg.arch!r}")
        super().__init__(cfg, **kwargs)
        if cfg.rope_scaling == "llama3":
            self.rope = Llama3RotaryEmbedding(cfg)

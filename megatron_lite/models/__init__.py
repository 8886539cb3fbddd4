"""Model zoo: decoder families in plain PyTorch, one ``ModelSpec`` each (``models/registry.py``).

``build_model`` builds a model (or one pipeline stage) from a ``ModelConfig`` with its family's
builder; ``load_hf`` / ``save_hf`` read and write Hugging Face checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.models.common.transformer import Transformer, init_std_for, init_weights

__all__ = ["Transformer", "build_model", "init_std_for", "init_weights", "load_hf", "save_hf"]


def build_model(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    layer_ids: Iterable[int] | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> Transformer:
    """Build a model on ``device``.

    On ``"meta"`` nothing is allocated (parallelize, then materialize local shards). On a real
    device the weights are initialised Megatron-style from ``seed`` (``seed=None`` skips init).
    """
    cls = cfg.family().model_cls
    with torch.device("meta"):
        model = cls(cfg, layer_ids=layer_ids, pre_process=pre_process, post_process=post_process, dtype=dtype)
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    if seed is not None:
        init_weights(model, cfg, seed)
    return model


def load_hf(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Read a Hugging Face checkpoint directory of a registered family into a ``Transformer``."""
    from megatron_lite.models.hf_io import load_hf as _load

    return _load(path, dtype=dtype, device=device)


def save_hf(model: Transformer, path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + safetensors)."""
    from megatron_lite.models.hf_io import save_hf as _save

    _save(model, path, dtype=dtype)

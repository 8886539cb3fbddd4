"""Llama 3's RoPE frequency scaling (``rope_scaling`` type "llama3", Llama 3.1 and later).

Wavelengths shorter than ``original_max_position / high_freq_factor`` keep their frequency,
those longer than ``original_max_position / low_freq_factor`` are slowed down by ``factor``, and
the band in between is interpolated smoothly between the two.
"""

from __future__ import annotations

import math

import torch

from megatron_lite.models.common.rope import RotaryEmbedding


def llama3_inv_freq(inv_freq: torch.Tensor, cfg) -> torch.Tensor:
    """Scale the plain RoPE inverse frequencies ``[hd/2]`` (fp32) as Llama 3 does."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq  # [hd/2]
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


class Llama3RotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose frequencies are rescaled by ``llama3_inv_freq``."""

    def __init__(self, cfg):
        super().__init__(cfg.head_dim, cfg.rope_theta)
        self.cfg = cfg

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        stale = self.inv_freq is None or self.inv_freq.device != device or self.inv_freq.is_meta
        if stale:
            self.inv_freq = None
            self.inv_freq = llama3_inv_freq(super()._inv_freq(device), self.cfg)  # [hd/2]
        return self.inv_freq

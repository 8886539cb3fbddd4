"""Rotary position embeddings, half-rotation layout (the layout of HF Mistral checkpoints)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for arbitrary (packed, restarting) position ids."""

    def __init__(self, head_dim: int, theta: float = 10000.0, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Not a buffer in the state dict: it is derived from the config and rebuilt after meta init.
        self.inv_freq: torch.Tensor | None = None

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        if self.inv_freq is None or self.inv_freq.device != device or self.inv_freq.is_meta:
            exponent = (
                torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            )
            self.inv_freq = 1.0 / (self.theta**exponent)  # [hd/2]
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin), each fp32 ``[b, s, hd]``, for ``position_ids`` ``[b, s]``."""
        inv_freq = self._inv_freq(position_ids.device)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, hd]
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[b, s, nq, hd]`` and ``k`` ``[b, s, nkv, hd]``.

    ``cos``/``sin`` are fp32 ``[b, s, hd]``.
    """
    cos = cos.unsqueeze(2)  # [b, s, 1, hd]
    sin = sin.unsqueeze(2)
    q_out = q.float() * cos + _rotate_half(q.float()) * sin
    k_out = k.float() * cos + _rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)

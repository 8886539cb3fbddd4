"""SwiGLU feed-forward with a fused gate/up projection."""

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """w2(silu(gate) * up) where ``w13`` holds [gate; up] stacked along its output rows."""

    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        self.w13 = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h]
        gate, up = self.w13(x).chunk(2, dim=-1)  # each [b, s, f] (local f under tensor parallel)
        return self.w2(F.silu(gate) * up)

"""Grouped-query self-attention with a fused QKV projection."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.models.common.attention_backends import AttentionMeta, causal_attention
from megatron_lite.models.common.rope import apply_rotary


class AttentionCore(nn.Module):
    """The kernel call: rotated q [b, s, nq, hd], k and v [b, s, nkv, hd] -> [b, s, nq, hd].

    Its own submodule (no parameters) so that a context-parallel implementation can wrap or
    replace exactly this step (ring/all-gather attention over sequence shards) and nothing else.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        return causal_attention(q, k, v, meta)  # [b, s, nq, hd]


class Attention(nn.Module):
    """Causal GQA. ``wqkv`` rows are three blocks [Q: nq*hd ; K: nkv*hd ; V: nkv*hd].

    ``num_heads`` and ``num_kv_heads`` are the heads this module computes; tensor-parallel
    ``parallelize`` lowers them to the local counts when it shards ``wqkv`` and ``wo``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim
        self.wqkv = nn.Linear(hidden_size, qkv_rows, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(num_heads * head_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.core = AttentionCore()

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta, cache=None
    ) -> torch.Tensor:
        """Attend over ``x`` ``[b, s, h]`` (``[b, s/tp, h]`` under sequence parallel).

        Args:
            x: hidden states.
            rope: fp32 (cos, sin) ``[b, s, hd]`` for the full sequence.
            meta: packing and window information shared by all layers.
            cache: optional KV cache (inference); it stores k/v and computes the attention itself.
        """
        qkv = self.wqkv(x)  # [b, s, (nq + 2 nkv) hd]; full s even under sequence parallel
        b, s, _ = qkv.shape
        hd = self.head_dim
        q, k, v = qkv.split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        q = q.view(b, s, self.num_heads, hd)
        k = k.view(b, s, self.num_kv_heads, hd)
        v = v.view(b, s, self.num_kv_heads, hd)
        q, k = apply_rotary(q, k, *rope)
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)  # [b, s, nq, hd]
        else:
            out = self.core(q, k, v, meta)  # [b, s, nq, hd]
        return self.wo(out.reshape(b, s, self.num_heads * hd))

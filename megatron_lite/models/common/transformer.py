"""The decoder shared by Mistral and Mixtral: plain PyTorch, no parallelism inside.

Parameter names are canonical (they are the state-dict keys that checkpoints, resharding and HF
conversion use). ``layers`` is a ``ModuleDict`` keyed by the global layer index, so a pipeline
stage that holds layers 8-9 still names them ``layers.8`` and ``layers.9``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.models.common.attention import Attention
from megatron_lite.models.common.attention_backends import AttentionMeta
from megatron_lite.models.common.mlp import MLP
from megatron_lite.models.common.moe import MoE
from megatron_lite.models.common.norm import RMSNorm
from megatron_lite.models.common.rope import RotaryEmbedding
from megatron_lite.parallel.context import global_positions


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.window = cfg.layer_window(layer_idx)  # None: attends to the whole sequence
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attention = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, layer_idx, **kw
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if cfg.is_moe:
            self.feed_forward = MoE(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_experts,
                cfg.top_k,
                cfg.aux_loss_coeff,
                cfg.z_loss_coeff,
                **kw,
            )
        else:
            self.feed_forward = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def forward(self, x, rope, meta: AttentionMeta, cache=None) -> torch.Tensor:  # [b, s, h]
        x = x + self.attention(self.attention_norm(x), rope, meta, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Mistral/Mixtral decoder, or one pipeline stage of it.

    Args:
        cfg: validated model config.
        layer_ids: global indices of the layers this instance holds (default: all).
        pre_process: holds the token embedding (first pipeline stage).
        post_process: holds the final norm and output layer (last pipeline stage).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_ids: Iterable[int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = range(cfg.num_layers) if layer_ids is None else layer_ids
        # Tied output weights need the embedding on the last stage too; the pipeline code keeps
        # the two copies equal (embedding-group gradient all-reduce).
        needs_embedding = pre_process or (post_process and cfg.tie_embeddings)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **kw) if needs_embedding else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, **kw) for i in layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw) if post_process else None
        untied_head = post_process and not cfg.tie_embeddings
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw) if untied_head else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.attention_backend = "auto"
        # A ``parallel.context.ContextParallel`` set by ``parallelize`` when parallel.context > 1:
        # the inputs are then this rank's two chunks of every sequence.
        self.context_parallel = None

    def forward(
        self,
        tokens_or_hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache=None,
        *,
        layers: Iterable[str] | None = None,
        pre_process: bool | None = None,
        post_process: bool | None = None,
    ) -> torch.Tensor:
        """Run the stage, or one virtual pipeline chunk of it.

        Args:
            tokens_or_hidden: token ids ``[b, s]`` when embedding, hidden ``[b, s, h]`` otherwise
                (``[b, s/tp, h]`` under sequence parallel).
            position_ids: ``[b, s]`` (restarting per document for packed rows); default ``0..s-1``.
                Needed on stages after the first under sequence parallel (to know ``s``).
            cu_seqlens: int32 document boundaries over the flattened batch, or None (one doc per row).
            max_seqlen: longest document, with ``cu_seqlens``.
            cache: KV cache for generation.
            layers: keys (global layer indices) of the held layers to run, in order; default all.
            pre_process: embed the input; default ``self.pre_process`` (a rank holding several
                virtual chunks embeds in its first chunk only).
            post_process: apply the final norm and output layer; default ``self.post_process``.

        Returns:
            Logits ``[b, s, V]`` after the output layer, hidden states ``[b, s, h]`` otherwise.
        """
        pre = self.pre_process if pre_process is None else pre_process
        post = self.post_process if post_process is None else post_process
        if (pre and not self.pre_process) or (post and not self.post_process):
            raise ValueError(
                f"this stage has pre_process={self.pre_process}, post_process={self.post_process}; "
                f"cannot run with pre_process={pre}, post_process={post}"
            )
        if pre:
            h = self.tok_embeddings(tokens_or_hidden)  # [b, s, h]
            b, s = tokens_or_hidden.shape
        else:
            h = tokens_or_hidden
            b, s = position_ids.shape if position_ids is not None else h.shape[:2]
        if position_ids is None and self.context_parallel is not None:  # this rank's two chunks
            cp = self.context_parallel
            position_ids = global_positions(cp.rank, cp.size, s, h.device).unsqueeze(0).expand(b, s)
        elif position_ids is None:
            position_ids = torch.arange(s, device=h.device).unsqueeze(0).expand(b, s)
        rope = self.rope(position_ids)  # cos, sin: [b, s, hd]
        blocks = list(self.layers.values() if layers is None else (self.layers[k] for k in layers))
        # One AttentionMeta (backend, mask) per distinct window among these layers, built once per
        # forward: alternating local/global layers share two masks, not one per layer.
        metas = {}
        for layer in blocks:
            if layer.window not in metas:
                metas[layer.window] = AttentionMeta(
                    cu_seqlens, max_seqlen, layer.window, self.attention_backend, cp=self.context_parallel
                )
                if cache is None:  # generation attends through the cache, without these masks
                    metas[layer.window].prepare(b, s, h.device, h.dtype)
        for layer in blocks:
            h = layer(h, rope, metas[layer.window], cache)
        if not post:
            return h
        h = self.norm(h)
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output layer: ``[b, s, h]`` -> ``[b, s, V]`` (tied to the embedding when configured)."""
        if self.output is not None:
            return self.output(h)
        return F.linear(h, self.tok_embeddings.weight)

    def moe_layers(self) -> list[MoE]:
        """The MoE feed-forward modules of this stage (empty for Mistral)."""
        return [m for m in self.modules() if isinstance(m, MoE)]


def init_std_for(name: str, cfg: ModelConfig) -> float | None:
    """Megatron-style init: std for a canonical parameter name, or None for ones (norm weights).

    Output projections (``attention.wo``, ``feed_forward.w2``, ``experts.w2``) use the scaled std
    ``init_std / sqrt(2 * num_layers)`` so the residual stream's variance does not grow with depth.
    """
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2")):
        return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    return cfg.init_std


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    """Initialise every parameter of ``model`` in place by its canonical name (deterministic in ``seed``)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        std = cfg.family().init_std(name, cfg)
        if std is None:
            param.fill_(1.0)
        else:
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
            param.copy_(values)

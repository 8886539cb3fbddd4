"""Causal attention behind one interface, with document packing and sliding windows.

Backends, picked by ``select_backend``:
  * ``flash``: flash-attn's varlen kernel (window and packing native). The only import of flash_attn.
  * ``flex``: PyTorch FlexAttention with a block mask built from document ids and the window;
    compiled on CUDA, so no dense ``s x s`` mask ever exists.
  * ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` for the plain causal case.
  * ``sdpa_masked``: SDPA with an explicit boolean mask. CPU-only fallback (FlexAttention has no CPU
    backward); it is never chosen for CUDA tensors by ``auto``.

Window semantics follow Mistral/HF: query ``i`` sees key ``j`` iff ``j <= i`` and ``i - j < window``.
Packed rows: ``cu_seqlens`` (int32, over the flattened ``[b*s]`` tokens) marks document starts;
tokens never attend across a boundary.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "flex", "sdpa", "sdpa_masked")


@dataclass
class AttentionMeta:
    """What the attention call needs beyond q, k, v; built once per forward and shared by all layers."""

    cu_seqlens: torch.Tensor | None = None  # int32 [num_docs + 1] over the flattened batch
    max_seqlen: int | None = None
    window: int | None = None
    backend: str = "auto"
    # Backend and mask depend only on the shapes, the packing and the window, not on the layer:
    # resolved once per forward (FlexAttention block masks are not free to build) and reused.
    resolved: dict = field(default_factory=dict, repr=False)

    def prepare(self, b: int, s: int, device: torch.device) -> tuple[str, int | None, torch.Tensor | None]:
        """``(backend, window, mask)`` for ``[b, s]`` inputs, resolved and built on the first call.

        ``Transformer.forward`` calls it before the layers, so a compiled block only looks the mask
        up (and a backend that cannot run fails there, once, naming the reason); the layers'
        ``causal_attention`` calls it again and gets the same objects.
        """
        if (b, s) not in self.resolved:
            window = self.window if self.window is not None and self.window < s else None
            backend = select_backend(self.backend, device, self.cu_seqlens is not None, window)
            mask = None
            if backend == "flex":
                mask = _flex_block_mask(self.cu_seqlens, b, s, window, device)
            elif backend == "sdpa_masked":
                mask = _dense_mask(b, s, self.cu_seqlens, window, device)  # [b, 1, s, s]
            self.resolved[(b, s)] = (backend, window, mask)
        return self.resolved[(b, s)]


@functools.cache
def flash_attn_available() -> bool:
    """Whether flash-attn is importable (checked once)."""
    return importlib.util.find_spec("flash_attn") is not None


def select_backend(requested: str, device: torch.device, packed: bool, window: int | None) -> str:
    """Resolve ``auto`` to a concrete backend; fail clearly when a requested one cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "flash":
        if not flash_attn_available():
            raise RuntimeError(
                "attention backend 'flash' requested but flash-attn is not installed "
                "(pip install flash-attn) "
            )
        if device.type != "cuda":
            raise RuntimeError("attention backend 'flash' needs CUDA tensors")
        return "flash"
    if requested == "flex" and device.type != "cuda":
        raise RuntimeError("attention backend 'flex' needs CUDA for backward; use 'auto' on CPU")
    if requested == "sdpa" and (packed or window is not None):
        raise RuntimeError(
            "attention backend 'sdpa' serves only plain causal attention: "
            "no packed documents, no sliding window"
        )
    if requested != "auto":
        return requested
    if not packed and window is None:
        return "sdpa"
    if device.type == "cuda":
        return "flash" if flash_attn_available() else "flex"
    return "sdpa_masked"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """Attention of ``q`` ``[b, s, nq, hd]`` over ``k``, ``v`` ``[b, s, nkv, hd]`` -> ``[b, s, nq, hd]``.

    ``nq`` must be a multiple of ``nkv`` (grouped-query attention, MQA when ``nkv == 1``).
    """
    backend, window, mask = meta.prepare(q.shape[0], q.shape[1], q.device)
    if backend == "flash":
        return _flash(q, k, v, meta.cu_seqlens, meta.max_seqlen, window)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, hd]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    elif backend == "flex":
        out = _compiled_flex()(qt, kt, vt, block_mask=mask, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def document_ids(cu_seqlens: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor:
    """Document index of every token, ``[b, s]``; each row its own document when unpacked."""
    if cu_seqlens is None:
        return torch.arange(b, device=device).unsqueeze(1).expand(b, s)
    flat = torch.zeros(b * s, dtype=torch.int64, device=device)
    starts = cu_seqlens[1:-1].long()
    flat[starts[starts < b * s]] = 1
    return flat.cumsum(0).view(b, s)


def _dense_mask(b: int, s: int, cu_seqlens, window: int | None, device) -> torch.Tensor:
    doc = document_ids(cu_seqlens, b, s, device)  # [b, s]
    pos = torch.arange(s, device=device)
    allowed = pos[:, None] >= pos[None, :]  # [s, s] causal
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    same_doc = doc[:, :, None] == doc[:, None, :]  # [b, s, s]
    return (allowed.unsqueeze(0) & same_doc).unsqueeze(1)  # [b, 1, s, s]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(cu_seqlens, b: int, s: int, window: int | None, device):
    """FlexAttention block mask: causal, same document, inside the window; no dense s x s tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(cu_seqlens, b, s, device)  # [b, s]

    def mask_mod(bi, hi, qi, ki):
        keep = (qi >= ki) & (doc[bi, qi] == doc[bi, ki])
        if window is not None:
            keep = keep & (qi - ki < window)
        return keep

    return create_block_mask(mask_mod, b, None, s, s, device=device)


def _flash(q, k, v, cu_seqlens, max_seqlen, window: int | None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    b, s, nq, hd = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        max_seqlen = s
    win = (window - 1, 0) if window is not None else (-1, -1)
    out = flash_attn_varlen_func(
        q.reshape(b * s, nq, hd),
        k.reshape(b * s, -1, hd),
        v.reshape(b * s, -1, hd),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        causal=True,
        window_size=win,
    )
    return out.view(b, s, nq, hd)

"""Causal attention behind one interface, with document packing and sliding windows.

Backends, picked by ``select_backend``:
  * ``flash``: flash-attn's varlen kernel (window and packing native), bf16/fp16 only. The only
    import of flash_attn; chosen only when it really imports (a wheel built for another torch falls
    back to FlexAttention with one warning).
  * ``flex``: PyTorch FlexAttention with a block mask computed block by block from document ids
    and the window (``flex_block_mask``), so no ``[b, 1, s, s]`` mask ever exists.
  * ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` for the plain causal case.
  * ``sdpa_masked``: SDPA with an explicit boolean mask. CPU-only fallback (FlexAttention has no CPU
    backward); it is never chosen for CUDA tensors by ``auto``.

Window semantics follow Mistral/HF: query ``i`` sees key ``j`` iff ``j <= i`` and ``i - j < window``.
Packed rows: ``cu_seqlens`` (int32, over the flattened ``[b*s]`` tokens) marks document starts;
tokens never attend across a boundary.

Masks are built once per microbatch: ``AttentionMeta`` keeps them for all layers of a forward, and
a cache keyed weakly by the ``cu_seqlens`` tensor shares them between the forwards of several
model chunks (virtual pipeline stages) on the same microbatch.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "flex", "sdpa", "sdpa_masked")
# What ``training.attention_backend`` accepts (sdpa_masked is the fallback "auto" picks itself).
SELECTABLE_BACKENDS = ("auto", "flash", "flex", "sdpa")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLEX_BLOCK = 128  # FlexAttention's default sparse block size

# id(cu_seqlens) -> {(b, s, window, backend, device): mask}: one microbatch's masks, shared by the
# forwards of all model chunks that see the same cu_seqlens object, dropped when the tensor dies.
_PACKED_MASKS: dict[int, dict] = {}


def _masks_of(cu_seqlens: torch.Tensor) -> dict:
    key = id(cu_seqlens)  # tensors compare elementwise, so they cannot be dict keys themselves
    if key not in _PACKED_MASKS:
        _PACKED_MASKS[key] = {}
        weakref.finalize(cu_seqlens, _PACKED_MASKS.pop, key, None)
    return _PACKED_MASKS[key]


@dataclass
class AttentionMeta:
    """What the attention call needs beyond q, k, v; built once per forward and shared by all layers."""

    cu_seqlens: torch.Tensor | None = None  # int32 [num_docs + 1] over the flattened batch
    max_seqlen: int | None = None
    window: int | None = None
    backend: str = "auto"
    # Context parallelism (a ``parallel.context.ContextParallel``): ``s`` is then this rank's two
    # chunks and attention gathers K/V over the cp group (``attention_cp``).
    cp: object = None
    # Backend and mask depend only on the shapes, the packing and the window, not on the layer:
    # resolved once per forward (FlexAttention block masks are not free to build) and reused.
    resolved: dict = field(default_factory=dict, repr=False)

    def prepare(
        self, b: int, s: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> tuple[str, int | None, torch.Tensor | None]:
        """``(backend, window, mask)`` for ``[b, s]`` inputs of ``dtype``, resolved and built once.

        ``Transformer.forward`` calls it before the layers, so a compiled block only looks the mask
        up (and a backend that cannot run fails there, once, naming the reason); the layers'
        ``causal_attention`` calls it again and gets the same objects.
        """
        key = (b, s, dtype)
        if key not in self.resolved and self.cp is not None:
            self.resolved[key] = self._prepare_cp(b, s, device, dtype)
        if key not in self.resolved:
            window = self.window if self.window is not None and self.window < s else None
            backend = select_backend(self.backend, device, self.cu_seqlens is not None, window, dtype)
            mask = None
            if backend in ("flex", "sdpa_masked"):
                mask = self._shared_mask(backend, b, s, window, torch.device(device))
            self.resolved[key] = (backend, window, mask)
        return self.resolved[key]

    def _prepare_cp(self, b: int, s: int, device, dtype) -> tuple[str, int | None, torch.Tensor]:
        from megatron_lite.models.common.attention_cp import CP_BACKENDS, cp_mask

        if self.backend not in CP_BACKENDS:
            raise RuntimeError(
                f"attention backend {self.backend!r} cannot serve context parallelism "
                f"(cp {self.cp.size}); use one of {', '.join(CP_BACKENDS)}"
            )
        mask = cp_mask(self.cp, self.cu_seqlens, b, s, self.window, torch.device(device), dtype)
        return "cp", self.window, mask

    def _shared_mask(self, backend: str, b: int, s: int, window: int | None, device: torch.device):
        """The microbatch's mask: built once, reused by other chunks' forwards on the same batch."""
        if self.cu_seqlens is None:  # the mask depends on the shapes only
            return _unpacked_mask(backend, b, s, window, device)
        masks = _masks_of(self.cu_seqlens)
        key = (b, s, window, backend, str(device))
        if key not in masks:
            masks[key] = _build_mask(backend, self.cu_seqlens, b, s, window, device)
        return masks[key]


def _build_mask(backend: str, cu_seqlens, b: int, s: int, window: int | None, device: torch.device):
    if backend == "flex":
        return flex_block_mask(cu_seqlens, b, s, window, device)
    return _dense_mask(b, s, cu_seqlens, window, device)  # [b, 1, s, s]


@functools.lru_cache(maxsize=2)  # training repeats one shape; a dense CPU mask can be large
def _unpacked_mask(backend: str, b: int, s: int, window: int | None, device: torch.device):
    return _build_mask(backend, None, b, s, window, device)


@functools.cache
def flash_attn_unavailable_reason() -> str | None:
    """Why flash-attn cannot be used (not installed, or installed but failing to import), or None.

    A wheel built for another torch or CUDA is found by the importer but fails with undefined
    symbols; only a real import tells. Checked once per process.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install flash-attn)"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError from its init
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return (
            f"flash-attn is installed but does not import ({first}); reinstall it built for "
            f"torch {torch.__version__}"
        )
    return None


def flash_attn_available() -> bool:
    """Whether flash-attn imports; warns once when it is installed but broken."""
    reason = flash_attn_unavailable_reason()
    if reason is not None and "does not import" in reason:
        _warn_broken_flash(reason)
    return reason is None


@functools.cache
def _warn_broken_flash(reason: str) -> None:
    warnings.warn(f"{reason}; attention uses FlexAttention instead", RuntimeWarning, stacklevel=3)


def select_backend(
    requested: str, device: torch.device, packed: bool, window: int | None, dtype: torch.dtype | None = None
) -> str:
    """Resolve ``auto`` to a concrete backend; fail clearly when a requested one cannot run.

    ``dtype`` is the inputs' dtype: flash-attn takes bf16/fp16 only, so fp32 never selects it.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "flash":
        reason = flash_attn_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"attention backend 'flash' requested but {reason}")
        if torch.device(device).type != "cuda":
            raise RuntimeError("attention backend 'flash' needs CUDA tensors; use 'auto' on CPU")
        if dtype is not None and dtype not in FLASH_DTYPES:
            raise RuntimeError(
                f"attention backend 'flash' needs bf16/fp16 inputs, got {dtype}: "
                "train in bf16 (training.precision: bf16) or use attention backend 'auto'"
            )
        return "flash"
    if requested == "flex" and torch.device(device).type != "cuda":
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
    if torch.device(device).type == "cuda":
        flash_ok = dtype in FLASH_DTYPES and flash_attn_available()
        return "flash" if flash_ok else "flex"
    return "sdpa_masked"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """Attention of ``q`` ``[b, s, nq, hd]`` over ``k``, ``v`` ``[b, s, nkv, hd]`` -> ``[b, s, nq, hd]``.

    ``nq`` must be a multiple of ``nkv`` (grouped-query attention, MQA when ``nkv == 1``).
    """
    backend, window, mask = meta.prepare(q.shape[0], q.shape[1], q.device, q.dtype)
    if backend == "cp":
        from megatron_lite.models.common.attention_cp import cp_attention

        return cp_attention(q, k, v, meta.cp, mask)
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


def flex_block_mask(cu_seqlens, b: int, s: int, window: int | None, device, block: int = FLEX_BLOCK):
    """FlexAttention block mask for causal, same-document, in-window attention.

    Built from per-block bounds instead of evaluating the mask on all ``s x s`` pairs (which is
    what ``create_block_mask`` does: 1 GiB of booleans at s = 32768). Document ids never
    decrease along a row, so for query block ``[q0, q1]`` and key block ``[k0, k1]``:

    * empty when ``k0 > q1`` (after every query), ``q0 - k1 >= window`` (all out of the window)
      or ``doc[k1] < doc[q0]`` (every key in an earlier document);
    * full when ``k1 <= q0``, ``q1 - k0 < window`` and ``doc[k0] == doc[q1]`` (one document);
    * partial otherwise: the kernel applies ``mask_mod`` there.

    Memory: ``[b, s]`` document ids plus ``[b, s/block, s/block]`` block tables.
    """
    from torch.nn.attention.flex_attention import BlockMask

    doc = document_ids(cu_seqlens, b, s, device)  # [b, s]

    def mask_mod(bi, hi, qi, ki):
        keep = (qi >= ki) & (doc[bi, qi] == doc[bi, ki])
        if window is not None:
            keep = keep & (qi - ki < window)
        return keep

    nblk = (s + block - 1) // block
    first = torch.arange(nblk, device=device) * block  # [n] first position of each block
    last = torch.clamp(first + block - 1, max=s - 1)  # [n] last real position
    q0, q1 = first[:, None], last[:, None]  # [n, 1] query blocks
    k0, k1 = first[None, :], last[None, :]  # [1, n] key blocks
    d_first, d_last = doc[:, first], doc[:, last]  # [b, n]
    empty = (k0 > q1) | (d_last[:, None, :] < d_first[:, :, None])  # [b, n, n]
    full = (k1 <= q0) & (d_first[:, None, :] == d_last[:, :, None])  # [b, n, n]
    if window is not None:
        empty = empty | (q0 - k1 >= window)
        full = full & (q1 - k0 < window)
    if s % block:  # blocks reaching past s stay partial: the kernel masks their padding
        ragged = first + block > s
        full = full & ~ragged[:, None] & ~ragged[None, :]
    full = full & ~empty
    partial = ~empty & ~full
    return BlockMask.from_kv_blocks(
        *_block_table(partial), *_block_table(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(s, s)
    )


def _block_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, n, n]`` bool -> (int32 ``[b, 1, n]`` counts, int32 ``[b, 1, n, n]`` indices, used first)."""
    counts = blocks.sum(-1, dtype=torch.int32)  # [b, n]
    order = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices  # selected blocks first
    return counts.unsqueeze(1), order.to(torch.int32).unsqueeze(1)


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

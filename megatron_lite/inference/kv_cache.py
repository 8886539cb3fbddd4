"""KV cache for incremental decoding: a rolling buffer for sliding-window models.

With a window ``W`` (query ``i`` sees key ``j`` iff ``j <= i`` and ``i - j < W``), no token ever needs
keys older than ``W - 1`` positions, so each layer keeps a ring of ``W`` slots and position ``p``
lives in slot ``p % W`` (Mistral 7B paper, section 2). Without a window the ring is simply as long
as the longest sequence the cache is built for.

A chunk of ``s`` new tokens attends to the cached keys plus itself under the causal/window mask
before its own keys are written, so chunked prefill works for any chunk size; ``generate`` uses
chunks of at most ``W`` tokens so the attention matrix per chunk stays ``W x 2W``.

Ragged batches are left-padded (``set_padding``): every row shares one column timeline, so one
ring slot per column serves all rows, and keys at a row's pad columns are masked out. A row's
position is ``column - pad``; window distances are column differences, identical to position
differences within a row.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value ring buffers, filled by ``Attention`` through ``attend``.

    Args:
        layer_ids: global indices of the model's layers (``Attention.layer_idx``).
        batch_size: rows decoded together.
        num_kv_heads: key/value heads per layer.
        head_dim: size of one head.
        max_seq_len: longest sequence (prompt + generated) the cache must hold.
        window: sliding window, or None for full attention.
        device: where the buffers live.
        dtype: dtype of the buffers (the model's activations).
    """

    def __init__(
        self,
        layer_ids: Iterable[int],
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        window: int | None = None,
        device=None,
        dtype=torch.float32,
    ):
        self.window = window
        self.max_seq_len = max_seq_len
        self.capacity = max_seq_len if window is None else min(window, max_seq_len)
        shape = (batch_size, self.capacity, num_kv_heads, head_dim)
        self._k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self._v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self._len = dict.fromkeys(self._k, 0)
        self.pad: torch.Tensor | None = None  # [b] left-pad columns per row, None: no padding
        self._step_mask = None  # ((start, n), [b, 1, 1, n] mask) of the current decode step

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Declare ``pad[i]`` leading pad columns in row ``i`` (int ``[b]``), never attended."""
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(dtype=torch.long)
        self._step_mask = None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep only ``rows`` (int ``[b']`` indices) of every buffer."""
        for i in self._k:
            self._k[i] = self._k[i].index_select(0, rows)
            self._v[i] = self._v[i].index_select(0, rows)
        if self.pad is not None:
            self.set_padding(self.pad.index_select(0, rows))

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int) -> KVCache:
        """A cache shaped for ``model`` (a ``Transformer``), in its parameter dtype and device."""
        cfg = model.cfg
        if len({layer.window for layer in model.layers.values()}) > 1:
            raise ValueError(
                "generation with per-layer attention windows (model.layer_types) is not supported yet"
            )
        param = next(model.parameters())
        attention = next(iter(model.layers.values())).attention  # local heads under tensor parallel
        return cls(
            [int(i) for i in model.layers],
            batch_size,
            attention.num_kv_heads,
            cfg.head_dim,
            max_seq_len,
            cfg.sliding_window,
            device=param.device,
            dtype=param.dtype,
        )

    @property
    def seq_len(self) -> int:
        """Tokens seen so far (by the layer that has seen the fewest)."""
        return min(self._len.values())

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``s`` new tokens over the cache and themselves; then store their k/v.

        Args:
            layer_idx: which layer's buffers.
            q: ``[b, s, nq, hd]``, rotated with absolute positions.
            k: ``[b, s, nkv, hd]``, rotated with absolute positions.
            v: ``[b, s, nkv, hd]``.

        Returns:
            ``[b, s, nq, hd]``.
        """
        start, s = self._len[layer_idx], q.shape[1]
        if self.window is None and start + s > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {start} cached + {s} new exceed it")
        if s == 1:
            return self._attend_one(layer_idx, q, k, v, start)
        keep = start if self.window is None else min(start, self.window - 1)  # cached keys still visible
        old_pos = torch.arange(start - keep, start, device=q.device)  # [keep]
        new_pos = torch.arange(start, start + s, device=q.device)  # [s]
        slots = old_pos % self.capacity
        keys = torch.cat([self._k[layer_idx][:, slots], k], dim=1)  # [b, keep + s, nkv, hd]
        values = torch.cat([self._v[layer_idx][:, slots], v], dim=1)
        key_pos = torch.cat([old_pos, new_pos])  # [keep + s]
        mask = key_pos[None, :] <= new_pos[:, None]  # [s, keep + s]
        if self.window is not None:
            mask = mask & (new_pos[:, None] - key_pos[None, :] < self.window)
        if self.pad is not None:
            # [b, 1, s, keep + s]; a pad query sees only itself (no all-masked row, no NaN).
            real = key_pos[None, None, :] >= self.pad[:, None, None]  # [b, 1, keep + s]
            mask = (mask & real) | (key_pos[None, :] == new_pos[:, None])
            mask = mask[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )  # [b, nq, s, hd]
        self._store(layer_idx, new_pos, k, v)
        return out.transpose(1, 2)

    def _attend_one(self, layer_idx: int, q, k, v, start: int) -> torch.Tensor:
        """Decode step (one new token): store first, then attend over the buffer in place (no copy).

        Overwriting slot ``start % W`` evicts column ``start - W``, which the new query may not see
        anyway, so every filled slot holds a visible key.
        """
        slot = start % self.capacity
        self._k[layer_idx][:, slot] = k[:, 0]
        self._v[layer_idx][:, slot] = v[:, 0]
        self._len[layer_idx] += 1
        n = min(start + 1, self.capacity)
        keys, values = self._k[layer_idx][:, :n], self._v[layer_idx][:, :n]  # [b, n, nkv, hd]
        mask = None
        if self.pad is not None:
            if self._step_mask is None or self._step_mask[0] != (start, n):  # once per step, all layers
                slots = torch.arange(n, device=q.device)
                slot_pos = start - (start - slots) % self.capacity  # column held by each slot, [n]
                keep = (slot_pos[None, :] >= self.pad[:, None])[:, None, None]  # [b, 1, 1, n]
                self._step_mask = ((start, n), keep)
            mask = self._step_mask[1]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )  # [b, nq, 1, hd]
        return out.transpose(1, 2)

    def _store(self, layer_idx: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the chunk's last ``capacity`` tokens into their ring slots."""
        n = min(positions.numel(), self.capacity)
        slots = positions[-n:] % self.capacity
        self._k[layer_idx][:, slots] = k[:, -n:].to(self._k[layer_idx].dtype)
        self._v[layer_idx][:, slots] = v[:, -n:].to(self._v[layer_idx].dtype)
        self._len[layer_idx] += positions.numel()

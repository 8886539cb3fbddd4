"""Batched generation of ragged prompts with one KV cache: the public ``generate_batch``.

Prompts of different lengths are **left-padded** to the longest, so all rows share one column
timeline: every decode step feeds one token per row at the same column, the ring buffer of a
sliding-window cache needs one slot per column for all rows, and finished rows are simply dropped
from the batch (``KVCache.keep_rows``). Each row's RoPE positions are ``column - pad`` (so a row
decodes exactly as it would alone) and the cache masks the pad columns out of every attention.
Right padding would instead need per-row write columns in the cache and per-row logits gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_lite.inference.generation import sample_next
from megatron_lite.inference.kv_cache import KVCache


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Continue every prompt of a ragged batch together; return the new tokens of each.

    A row ends at the first of: an ``eos_id`` token (kept as its last token), its own
    ``max_new_tokens``, or one of ``stop_strings`` appearing in ``decode(new tokens of the row)``
    (the row is cut right after the token that completed it, so the stop text ends the decoded
    row). Finished rows leave the batch, so the others decode at the batch size still running.
    All prompts form one batch: the cache holds ``len(prompts) x (longest prompt + most new
    tokens)`` keys and values per layer, so callers with many prompts pass them in slices.

    Works on a plain ``Transformer`` or a tensor-parallel one (every rank of the tp group calls it
    with the same arguments and gets the same lists; the vocab-parallel logits are gathered).

    Args:
        model: a whole ``Transformer`` (plain or tensor-parallel), put in eval mode here.
        prompts: one non-empty list of token ids per row, any lengths.
        max_new_tokens: tokens to add at most, one int for all rows or one per row.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_k: keep only the k most likely tokens when sampling.
        top_p: nucleus sampling threshold.
        eos_id: end-of-sequence id, or several.
        stop_strings: texts that end a row; requires ``decode``.
        decode: token ids -> text (e.g. ``tokenizer.detokenize``), used for ``stop_strings``.
        seed: seed of a private sampling generator (default: torch's global RNG). Sampled tokens
            depend on the batch they were drawn in; greedy output does not.

    Returns:
        ``list[list[int]]``: the generated tokens of each prompt, in prompt order.
    """
    rows, limits = _check(model, prompts, max_new_tokens, stop_strings, decode)
    eos = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    model.eval()
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in rows]
    live = [i for i in range(len(rows)) if limits[i] > 0]  # original index of each batch row
    if not live:
        return out
    with torch.no_grad():
        tokens, pad = _left_pad([rows[i] for i in live], device)  # [b, L], [b]
        cache = KVCache.for_model(model, len(live), tokens.shape[1] + max(limits[i] for i in live))
        cache.set_padding(pad)
        logits = _forward_last(model, tokens, pad, cache, chunk=cache.window or tokens.shape[1])
        while live:
            token = sample_next(logits, temperature, top_k, top_p, generator)  # [b]
            keep = []
            for j, (i, t) in enumerate(zip(live, token.tolist())):
                out[i].append(t)
                if not (t in eos or len(out[i]) >= limits[i] or _stopped(out[i], stop_strings, decode)):
                    keep.append(j)
            if len(keep) < len(live):
                if not keep:
                    break
                index = torch.tensor(keep, device=device)
                cache.keep_rows(index)
                token, pad = token[index], pad[index]
                live = [live[j] for j in keep]
            logits = _forward_last(model, token[:, None], pad, cache, chunk=1)
    return out


def _check(model, prompts, max_new_tokens, stop_strings, decode) -> tuple[list[list[int]], list[int]]:
    """Validate the arguments; return the prompts as lists and the per-row token limits."""
    rows = [list(p) for p in prompts]
    vocab = model.cfg.vocab_size
    for k, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {k} is empty: every prompt needs at least one token")
        if min(row) < 0 or max(row) >= vocab:
            raise ValueError(
                f"prompt {k}: token ids must be in [0, {vocab}) (the model's vocab), "
                f"got {min(row)}..{max(row)}: wrong tokenizer?"
            )
    limits = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(rows) or any(n < 0 for n in limits):
        raise ValueError(
            f"max_new_tokens must be an int >= 0 or one per prompt ({len(rows)}), got {max_new_tokens}"
        )
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode (a callable token ids -> text, e.g. tokenizer.detokenize)")
    return rows, limits


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> ``[b, L]`` ids left-padded with 0 (masked, never attended) and the pad counts ``[b]``."""
    longest = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
    pad = torch.tensor([longest - len(r) for r in rows], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def _stopped(row: list[int], stop_strings, decode) -> bool:
    """Whether a stop string appears in the decoded new tokens of the row."""
    if not stop_strings:
        return False
    text = decode(row)
    return any(s in text for s in stop_strings)


def _forward_last(model, tokens: torch.Tensor, pad: torch.Tensor, cache: KVCache, chunk: int) -> torch.Tensor:
    """Feed ``tokens`` ``[b, s]`` (the next columns) through the cache in chunks; return the full
    logits ``[b, V]`` of the last column only (the output layer never sees the other columns)."""
    b, s = tokens.shape
    h = None
    for start in range(0, s, chunk):
        piece = tokens[:, start : start + chunk]
        columns = torch.arange(cache.seq_len, cache.seq_len + piece.shape[1], device=tokens.device)
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # [b, chunk]; pads: 0, unused
        h = model(piece, position_ids=positions, cache=cache, post_process=False)  # [b, chunk, h]
    logits = model.logits(model.norm(h[:, -1:]))[:, 0]  # [b, V] or [b, V_pad / tp]
    return _full_vocab(model, logits)


def _full_vocab(model, logits: torch.Tensor) -> torch.Tensor:
    """Gather vocab-parallel logits ``[b, V_pad / tp]`` over the tp group and cut the padding."""
    shard = getattr(model, "vocab_parallel", None)
    if shard is None:
        return logits
    state = model.parallel_state
    if state.dims.tp > 1:
        parts = [torch.empty_like(logits) for _ in range(state.dims.tp)]
        dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
        logits = torch.cat(parts, dim=-1)  # [b, V_pad]
    return logits[:, : shard.vocab_size]

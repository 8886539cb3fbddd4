"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_lite.inference.kv_cache import KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``logits`` ``[b, V]`` -> int64 ``[b]``.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature, cut to
    the ``top_k`` best and to the smallest set whose probability reaches ``top_p`` (the best token
    always survives), and sampled.
    """
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [b, V]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
):
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a whole ``Transformer`` (put in eval mode here).
        prompt_ids: int tensor ``[b, s]``, one list of ids, or a list of lists (rows of different
            lengths are decoded together, left-padded: see ``generate_batch``).
        max_new_tokens: tokens to add per row.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_k: keep only the k most likely tokens when sampling.
        top_p: nucleus sampling threshold.
        eos_id: a row stops after producing this token (it is included in the output).
        seed: seed of the sampling generator (default: torch's global RNG).

    Returns:
        The new tokens: ``list[list[int]]`` per row, or ``list[int]`` for a single flat list prompt.
    """
    from megatron_lite.inference.batch import generate_batch  # batch imports sample_next from here

    flat = isinstance(prompt_ids, Sequence) and (not prompt_ids or isinstance(prompt_ids[0], int))
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(
                f"prompt must be non-empty rows of token ids, got shape {list(prompt_ids.shape)}"
            )
        rows = prompt_ids.tolist()
    else:
        rows = [list(prompt_ids)] if flat else prompt_ids
    out = generate_batch(
        model,
        rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        seed=seed,
    )
    return out[0] if flat else out


def prefill(model, prompt: torch.Tensor, cache: KVCache, chunk_size: int | None = None) -> torch.Tensor:
    """Run ``prompt`` ``[b, s]`` through the model into ``cache``; return the last logits ``[b, V]``.

    Long prompts go in chunks of at most the sliding window (``chunk_size`` overrides), so the
    attention of each chunk is over at most ``2 W`` keys.
    """
    b, s = prompt.shape
    chunk = chunk_size or cache.window or s
    logits = None
    for start in range(0, s, chunk):
        tokens = prompt[:, start : start + chunk]
        base = cache.seq_len
        positions = torch.arange(base, base + tokens.shape[1], device=prompt.device).expand(b, -1)
        logits = model(tokens, position_ids=positions, cache=cache)[:, -1]
    return logits

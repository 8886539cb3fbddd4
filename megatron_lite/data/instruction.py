"""Instruction data: conversations to tokens + loss mask, packing, instruction-augmented texts.

Loss-mask convention: one uint8 per token, 1 where the token is a training target (response
tokens and the EOD closing them), 0 for prompt/template tokens, BOS and padding. Every example
ends with EOD, so packed-sequence metadata (``cu_seqlens``) keeps packed examples apart.

Record formats (JSONL):
  * ``{"prompt": ..., "response": ...}``
  * ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (ends with
    an assistant turn)
  * preference pairs (DPO; TRL's field names): ``{"prompt": ..., "chosen": ..., "rejected": ...}``
    tokenized as two conversations sharing the prompt's tokens (``tokenize_preference``)
  * instruction-augmented pretraining (Instruction Pre-Training, Cheng et al. 2024):
    ``{"text": raw, "instruction_pairs": [{"prompt": q, "response": a}, ...]}`` rendered as the
    raw text followed by its question/answer pairs in ``AUGMENTED_TEMPLATE``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from megatron_lite.data import helpers

USER_TEMPLATE = "[INST] {content} [/INST]"  # Mistral instruct (v1) turn format
AUGMENTED_TEMPLATE = "{text}\n\n{pairs}"
AUGMENTED_PAIR_TEMPLATE = "Question: {prompt}\nAnswer: {response}"
_PAIR_KEYS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))


def parse_messages(record: dict, where: str) -> list[tuple[str, str]]:
    """(role, content) turns of an instruction record; ``where`` (``file:line``) prefixes errors."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"{where}: messages[{i}] needs role system/user/assistant, got {m!r:.80}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}].content must be a string")
            turns.append((m["role"], m["content"]))
        return turns
    for pk, rk in _PAIR_KEYS:
        if pk in record and rk in record:
            if not isinstance(record[pk], str) or not isinstance(record[rk], str):
                raise ValueError(f"{where}: '{pk}' and '{rk}' must be strings")
            return [("user", record[pk]), ("assistant", record[rk])]
    raise ValueError(
        f"{where}: instruction record needs 'messages' or 'prompt'+'response' (has {sorted(record)})"
    )


def tokenize_conversation(
    tokenizer, turns: list[tuple[str, str]], where: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and loss mask of a conversation.

    Layout: ``BOS [INST] user [/INST] assistant EOD [INST] user [/INST] assistant EOD ...``;
    a system message is prepended to the first user turn.

    Returns:
        (tokens int32 [n], loss_mask uint8 [n]).
    """
    if turns[-1][0] != "assistant":
        raise ValueError(f"{where}: conversation must end with an assistant turn")
    ids: list[int] = [tokenizer.bos] if getattr(tokenizer, "bos", None) is not None else []
    mask: list[int] = [0] * len(ids)
    system = ""
    for role, content in turns:
        if role == "system":
            system = content + "\n\n"
            continue
        if role == "user":
            piece = tokenizer.encode_raw(USER_TEMPLATE.format(content=system + content))
            system = ""
            ids += piece
            mask += [0] * len(piece)
        else:
            piece = tokenizer.encode_raw(content) + [tokenizer.eod]
            ids += piece
            mask += [1] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def tokenize_preference(tokenizer, record: dict, where: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
    """Chosen and rejected conversations of a preference record, the loss mask on the responses.

    Both start with the same prompt tokens (the prompt is tokenized once, on its own).

    Returns:
        [(chosen tokens int32 [n], mask uint8 [n]), (rejected tokens, mask)].
    """
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise ValueError(
                f"{where}: preference record needs string 'prompt', 'chosen' and 'rejected' "
                f"(field '{key}' is {type(record.get(key)).__name__})"
            )
    for key in ("chosen", "rejected"):
        if not record[key].strip():  # DPO would compare an answer with no answer (EOD alone)
            raise ValueError(f"{where}: preference record has an empty '{key}' response")
    if record["chosen"] == record["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text")
    return [
        tokenize_conversation(tokenizer, [("user", record["prompt"]), ("assistant", record[k])], where)
        for k in ("chosen", "rejected")
    ]


def augment_text(record: dict, where: str) -> str:
    """Raw text followed by its instruction/response pairs (``AUGMENTED_TEMPLATE``)."""
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: instruction-augmented record needs a string 'text'")
    pairs = record.get("instruction_pairs", record.get("qa_pairs", []))
    if not isinstance(pairs, list):
        raise ValueError(f"{where}: 'instruction_pairs' must be a list")
    rendered = []
    for i, pair in enumerate(pairs):
        turns = parse_messages(pair, f"{where}: instruction_pairs[{i}]") if isinstance(pair, dict) else None
        if turns is None or len(turns) != 2:
            raise ValueError(f"{where}: instruction_pairs[{i}] must be {{'prompt': ..., 'response': ...}}")
        rendered.append(AUGMENTED_PAIR_TEMPLATE.format(prompt=turns[0][1], response=turns[1][1]))
    return AUGMENTED_TEMPLATE.format(text=text, pairs="\n\n".join(rendered)).rstrip()


def tokenize_augmented(tokenizer, record: dict, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Tokens (+EOD) of an instruction-augmented text; the loss covers every token but BOS."""
    ids = tokenizer.tokenize(augment_text(record, where)) + [tokenizer.eod]
    mask = np.ones(len(ids), dtype=np.uint8)
    if getattr(tokenizer, "add_bos", False):
        mask[0] = 0
    return np.asarray(ids, dtype=np.int32), mask


def interleave(
    primary: Iterable, secondary: Callable[[], Iterable], secondary_ratio: float
) -> Iterator[tuple[bool, object]]:
    """Mix two streams so ``secondary_ratio`` of the output comes from ``secondary``.

    Uses the blending rule (pick the stream lagging its share most, primary on ties). Ends with
    ``primary``; ``secondary()`` is re-opened whenever it runs out.

    Yields:
        (from_secondary, item).
    """
    if not 0.0 <= secondary_ratio < 1.0:
        raise ValueError(f"mix ratio must lie in [0, 1), got {secondary_ratio}")
    prim = iter(primary)
    sec = iter(secondary())
    taken = [0, 0]
    step = 0
    while True:
        scale = max(float(step), 1.0)
        use_sec = secondary_ratio * scale - taken[1] > (1.0 - secondary_ratio) * scale - taken[0]
        if use_sec:
            item = next(sec, StopIteration)
            if item is StopIteration:
                sec = iter(secondary())
                item = next(sec, StopIteration)
                if item is StopIteration:
                    raise ValueError("mix input is empty")
        else:
            item = next(prim, StopIteration)
            if item is StopIteration:
                return
        taken[int(use_sec)] += 1
        step += 1
        yield use_sec, item


def pack_examples(
    examples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """First-fit-decreasing packing of examples into rows of exactly ``seq_length`` tokens.

    Examples longer than ``seq_length`` must be truncated by the caller. Inside a row, examples
    keep their input order; padding (``pad_id``, loss mask 0) fills the rest.

    Yields:
        (tokens int32 [seq_length], loss_mask uint8 [seq_length]) per row.
    """
    if not examples:
        return
    lengths = np.array([len(t) for t, _ in examples], dtype=np.int64)
    bins = helpers.ffd_pack(lengths, seq_length)
    order = np.lexsort((np.arange(len(examples)), bins))  # by bin, then input order
    cuts = np.flatnonzero(np.diff(bins[order])) + 1
    for group in np.split(order, cuts):
        tokens = np.full(seq_length, pad_id, dtype=np.int32)
        mask = np.zeros(seq_length, dtype=np.uint8)
        pos = 0
        for i in group:
            t, m = examples[i]
            tokens[pos : pos + len(t)] = t
            mask[pos : pos + len(m)] = m
            pos += len(t)
        yield tokens, mask

"""Pure functions over model output: stop strings, de-dup keys, ``<QUE>``/``<ANS>`` pairs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUE, ANS, END = "<QUE>", "<ANS>", "</END>"
_SPACE = re.compile(r"\s+")


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def normalize_text(text: str) -> str:
    """De-dup key: case-folded, whitespace collapsed, surrounding whitespace and punctuation gone."""
    return _SPACE.sub(" ", text.casefold()).strip().strip(".?!:;,\"' ")


@dataclass
class ParsedPairs:
    """Result of ``parse_qa_pairs``.

    Attributes:
        pairs: ``[{"prompt": question, "response": answer}, ...]`` in output order.
        bad_segments: ``</END>``-closed segments that were not one well-formed pair.
        duplicates: pairs dropped because their question (normalized) came earlier.
        unterminated: the output ended inside a pair (no closing ``</END>``; usually the token
            limit), which was dropped.
    """

    pairs: list[dict] = field(default_factory=list)
    bad_segments: int = 0
    duplicates: int = 0
    unterminated: bool = False


def parse_qa_pairs(output: str) -> ParsedPairs:
    """Instruction-response pairs of an Instruction Pre-Training synthesizer's output.

    The synthesizer (Cheng et al. 2024) writes ``<QUE> question <ANS> answer </END>`` repeatedly.
    A segment counts only if it holds exactly one ``<QUE>`` (first) and one ``<ANS>``, both parts
    non-empty; a trailing segment without ``</END>`` is incomplete and dropped; a repeated question
    (normalized) is dropped.
    """
    result = ParsedPairs()
    segments = output.split(END)
    tail = segments.pop()  # text after the last </END> (all of it when there is none)
    result.unterminated = bool(tail.strip())
    seen: set[str] = set()
    for seg in segments:
        seg = seg.strip()
        if not seg.startswith(QUE) or seg.count(QUE) != 1 or seg.count(ANS) != 1:
            result.bad_segments += 1
            continue
        question, answer = (s.strip() for s in seg[len(QUE) :].split(ANS))
        if not question or not answer:
            result.bad_segments += 1
            continue
        key = normalize_text(question)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        result.pairs.append({"prompt": question, "response": answer})
    return result

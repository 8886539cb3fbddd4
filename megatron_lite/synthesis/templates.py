"""Chat templates for Magpie, given by name or by a small JSON/YAML file.

A template is three strings: the pre-query prefix (everything before the user's message), the
post-query prefix (after the user's message, up to where the assistant's answer starts) and the
end-of-turn marker. Magpie feeds an aligned model the pre-query prefix alone, so it writes a user
query; the query ends where the model emits the post-query marker (or end of turn / EOS).

Template strings may contain the tokenizer's special tokens as text (``<s>``, ``</s>``,
``<|eot_id|>``); ``encode_with_specials`` maps them to their ids instead of spelling them out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format.

    Attributes:
        name: label for logs.
        pre_query: text before the user's message (with BOS if the format has one).
        post_query: text between the user's message and the assistant's answer.
        end_of_turn: text closing the assistant's answer.
        query_stops: strings that end a sampled query (default: ``post_query`` stripped of
            whitespace, and ``end_of_turn``).
    """

    name: str
    pre_query: str
    post_query: str
    end_of_turn: str
    query_stops: tuple[str, ...] = field(default=())

    def instruction_stops(self) -> list[str]:
        """Strings that end a sampled instruction."""
        stops = list(self.query_stops) or [self.post_query.strip(), self.end_of_turn]
        return [s for s in stops if s]

    def response_stops(self) -> list[str]:
        """Strings that end a sampled response."""
        return [self.end_of_turn] if self.end_of_turn else []

    def query_prompt(self) -> str:
        """What Magpie feeds the model: the pre-query prefix without trailing spaces.

        In real conversations the space after ``[INST]`` belongs to the query's first word (one
        token, ``▁What``); a lone trailing space would be a token the model has rarely seen there.
        """
        return self.pre_query.rstrip(" ")

    def response_prompt(self, instruction: str) -> str:
        """The conversation up to where the assistant's answer starts."""
        return f"{self.pre_query}{instruction}{self.post_query}"


BUILTIN_TEMPLATES = {
    # Mistral instruct: <s>[INST] query [/INST]answer</s>
    "mistral": ChatTemplate("mistral", "<s>[INST] ", " [/INST]", "</s>"),
    # Llama 3 instruct: header tokens around each role, <|eot_id|> ends a turn.
    "llama3": ChatTemplate(
        "llama3",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
}
_FILE_KEYS = {"name", "pre_query", "post_query", "end_of_turn", "query_stops"}


def load_template(spec: str) -> ChatTemplate:
    """A built-in template by name (``mistral``, ``llama3``) or one read from a JSON/YAML file.

    The file holds ``pre_query``, ``post_query`` and ``end_of_turn`` strings, optionally ``name``
    and a ``query_stops`` list.

    Raises:
        ValueError: unknown name, unreadable file, or a missing/mistyped field (one line naming it).
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if not os.path.isfile(spec):
        raise ValueError(
            f"chat template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    with open(spec, encoding="utf-8") as f:
        raw = f.read()
    try:
        if spec.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ValueError(f"{spec}: cannot parse chat template: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: chat template must be a mapping of {sorted(_FILE_KEYS)}")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ValueError(f"{spec}: unknown chat template field(s) {sorted(unknown)}")
    for key in ("pre_query", "post_query", "end_of_turn"):
        if not isinstance(data.get(key), str):
            raise ValueError(f"{spec}: chat template field '{key}' must be a string, got {data.get(key)!r}")
    stops = data.get("query_stops", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{spec}: chat template field 'query_stops' must be a list of strings")
    return ChatTemplate(
        str(data.get("name", os.path.basename(spec))),
        data["pre_query"],
        data["post_query"],
        data["end_of_turn"],
        tuple(stops),
    )


def special_tokens(tokenizer) -> dict[str, int]:
    """Special-token text -> id for tokens a plain encode would spell out piece by piece.

    SentencePiece treats ``<s>``/``</s>`` in text as ordinary characters, so they are mapped here;
    ``tokenizers`` files already match their added special tokens in text.
    """
    sp = getattr(tokenizer, "_sp", None)
    if sp is None:
        return {}
    out = {}
    for tid in (getattr(tokenizer, "bos", None), getattr(tokenizer, "eod", None)):
        if tid is not None and tid >= 0:
            out[sp.id_to_piece(int(tid))] = int(tid)
    return out


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` where special-token text (``<s>``, ``</s>``) becomes its single id."""
    specials = special_tokens(tokenizer)
    if not specials:
        return list(tokenizer.encode_raw(text))
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += tokenizer.encode_raw(part)
    return ids

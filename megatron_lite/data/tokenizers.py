"""Tokenizers behind one small interface (no hub access: every model is a local file).

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns an object with
``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``encode_raw(text)`` (no special
tokens), ``vocab_size``, ``eod`` (appended after documents), ``bos`` and ``pad``.
"""

from __future__ import annotations

import json
import os
from importlib import util as importlib_util

from megatron_lite.config import TOKENIZER_TYPES  # one list, also validated by the config

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<PAD>")


def bundled_mistral_tokenizer_path(name: str = "tokenizer.model.v1") -> str:
    """Path of a SentencePiece model shipped inside the installed ``mistral_common`` package.

    Args:
        name: file in ``mistral_common/data``; the default is the Mistral 7B / Mixtral 8x7B
            tokenizer (32000 pieces).
    """
    spec = importlib_util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "bundled Mistral tokenizer needs the 'mistral-common' package (pip install it)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled Mistral tokenizer not found: {path}")
    return path


class SentencePieceTokenizer:
    """Plain SentencePiece model: ``tokenize`` adds no special tokens; EOD is ``</s>``."""

    add_bos = False

    def __init__(self, model_file: str):
        import sentencepiece

        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = int(self._sp.get_piece_size())
        eos = self._sp.eos_id()
        self.eod = eos if eos >= 0 else self._piece_id("</s>", "<|endoftext|>")
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else self._piece_id("<s>")
        pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._piece_id("<pad>", "<PAD>")
        self.pad = pad if pad is not None and pad >= 0 else self.eod
        if self.eod is None or self.eod < 0:
            raise ValueError(f"{model_file}: SentencePiece model has no end-of-document piece (</s>)")

    def _piece_id(self, *pieces: str) -> int | None:
        unk = self._sp.unk_id()
        for piece in pieces:
            pid = self._sp.piece_to_id(piece)
            if pid != unk:
                return int(pid)
        return None

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self._sp.encode(text)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a document (with BOS first for Llama-style tokenizers)."""
        ids = self._sp.encode(text)
        return [self.bos, *ids] if self.add_bos else ids

    def detokenize(self, ids) -> str:
        """Text of token ids (control tokens such as BOS/EOS are dropped)."""
        return self._sp.decode([int(i) for i in ids])


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama/Mistral ``tokenizer.model``: ``tokenize`` prepends BOS (``<s>``), EOD is ``</s>``."""

    add_bos = True

    def __init__(self, model_file: str):
        super().__init__(model_file)
        if self.bos is None or self.bos < 0:
            raise ValueError(f"{model_file}: Llama-style tokenizer needs a BOS piece (<s>)")


class MistralTokenizer(Llama2Tokenizer):
    """Mistral 7B / Mixtral SentencePiece tokenizer (same conventions as Llama 2)."""


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` file (or a directory holding one) loaded with the ``tokenizers`` package.

    ``tokenize`` applies the file's post-processor (e.g. a BOS); special ids come from
    ``tokenizer_config.json`` when present beside the file, else from well-known token names.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"HuggingFace tokenizer file not found: {json_path}")
        self.model_file = json_path
        self._tok = Tokenizer.from_file(json_path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = self._read_config(os.path.dirname(json_path))
        self.eod = self._special(config.get("eos_token"), _EOS_CANDIDATES)
        self.bos = self._special(config.get("bos_token"), _BOS_CANDIDATES)
        pad = self._special(config.get("pad_token"), _PAD_CANDIDATES)
        if self.eod is None:
            raise ValueError(
                f"{json_path}: no end-of-document token found (looked for {', '.join(_EOS_CANDIDATES)})"
            )
        self.pad = pad if pad is not None else self.eod

    @staticmethod
    def _read_config(directory: str) -> dict:
        path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _special(self, configured, candidates: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for token in ([configured] if configured else []) + list(candidates):
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return int(tid)
        return None

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a document, special tokens added by the file's post-processor."""
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        """Text of token ids (special tokens skipped)."""
        return self._tok.decode([int(i) for i in ids])


_CLASSES = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "MistralTokenizer": MistralTokenizer,
    "Llama2Tokenizer": Llama2Tokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None):
    """Build a tokenizer from a local model file.

    Args:
        tokenizer_type: one of ``TOKENIZER_TYPES``.
        tokenizer_model: a SentencePiece ``.model`` file, a ``tokenizer.json`` or a directory
            with one (HuggingFaceTokenizer). ``"bundled"`` (or None for MistralTokenizer) picks
            the Mistral tokenizer shipped in ``mistral_common``.

    Raises:
        ValueError: unknown type. FileNotFoundError: model file missing.
    """
    if tokenizer_type not in _CLASSES:
        raise ValueError(
            f"unknown tokenizer_type {tokenizer_type!r} (choose from {', '.join(TOKENIZER_TYPES)})"
        )
    if tokenizer_model in (None, "bundled") and tokenizer_type in ("MistralTokenizer", "Llama2Tokenizer"):
        tokenizer_model = bundled_mistral_tokenizer_path()
    if not tokenizer_model:
        raise ValueError(f"tokenizer_type {tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer_model not found: {tokenizer_model}")
    return _CLASSES[tokenizer_type](tokenizer_model)

"""Preprocessing pipeline: JSONL -> cleaned, deduplicated, tokenized MMIDIDX datasets.

Workers (a multiprocessing pool) parse, filter, hash and tokenize chunks of lines; the main
process of each partition deduplicates and writes. Outputs are written under temporary names
and renamed only when the whole run succeeded, so an interrupted run leaves nothing under the
final names. ``tools/preprocess_data.py`` is the command line front end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_lite.data.cleaning import MinHasher, QualityFilter, exact_hash
from megatron_lite.data.instruction import (
    parse_messages,
    tokenize_augmented,
    tokenize_conversation,
    tokenize_preference,
)
from megatron_lite.data.tokenizers import build_tokenizer

MODES = ("text", "instruction", "augmented", "preference")


class PreprocessError(Exception):
    """Bad input that stops the run (message names file, line and field)."""


@dataclass
class PreprocessOptions:
    """Everything a preprocessing run needs (picklable: workers receive a copy)."""

    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 10000
    on_error: str = "stop"
    mode: str = "text"
    mix_inputs: list[str] = field(default_factory=list)
    mix_ratio: float = 0.0
    pack_seq_length: int | None = None
    pack_buffer: int = 100_000
    quality: QualityFilter = field(default_factory=QualityFilter)
    dedup_exact: bool = False
    dedup_minhash: bool = False
    minhash_threshold: float = 0.8
    minhash_num_perm: int = 128
    minhash_bands: int | None = None
    minhash_rows: int | None = None
    minhash_ngram: int = 5
    chunk_lines: int = 256

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent option."""
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"--on-error must be skip or stop, got {self.on_error!r}")
        if self.workers < 1 or self.partitions < 1:
            raise ValueError(f"--workers ({self.workers}) and --partitions ({self.partitions}) must be >= 1")
        if self.mode != "text" and len(self.json_keys) != 1:
            raise ValueError("instruction modes write one dataset: give a single --json-keys name")
        if self.mix_inputs and (self.mode == "text" or self.partitions > 1):
            raise ValueError("--mix-input needs --instruction or --instruction-augmented and --partitions 1")
        if self.pack_seq_length is not None and (self.mode == "text" or self.pack_seq_length < 2):
            raise ValueError("--pack-seq-length needs an instruction mode and a length >= 2")
        if self.mode == "preference" and (self.pack_seq_length is not None or self.mix_inputs):
            raise ValueError("--preference pairs are not packed or mixed: drop --pack-seq-length/--mix-input")
        if self.dedup_minhash and not 0.0 < self.minhash_threshold < 1.0:
            raise ValueError(f"--minhash-threshold must lie in (0, 1), got {self.minhash_threshold}")

    @property
    def with_loss_mask(self) -> bool:
        """Instruction modes store a loss-mask dataset beside the tokens."""
        return self.mode != "text"


class Encoder:
    """Worker-side work: parse, filter, hash and tokenize one line."""

    def __init__(self, opts: PreprocessOptions):
        self.opts = opts
        self.tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model)
        self.minhasher = None
        if opts.dedup_minhash:
            self.minhasher = MinHasher(opts.minhash_num_perm, opts.minhash_ngram)

    def _texts(self, record, where: str) -> dict[str, str]:
        texts = {}
        for key in self.opts.json_keys:
            if key not in record:
                raise PreprocessError(f"{where}: missing key '{key}'")
            if not isinstance(record[key], str):
                raise PreprocessError(
                    f"{where}: key '{key}' is {type(record[key]).__name__}, expected a string"
                )
            texts[key] = record[key]
        return texts

    def _encode_record(self, record, where: str, kind: str) -> tuple[str, dict]:
        """(text used for cleaning, {key: (tokens int32 [n], loss mask uint8 [n] or None)}).

        A preference record gives ``{key: [chosen, rejected]}``: two consecutive sequences.
        """
        key = self.opts.json_keys[0]
        try:
            if kind == "preference":
                text = "\n".join(str(record.get(k, "")) for k in ("prompt", "chosen", "rejected"))
                return text, {key: tokenize_preference(self.tokenizer, record, where)}
            if kind == "instruction":
                turns = parse_messages(record, where)
                return "\n".join(c for _, c in turns), {
                    key: tokenize_conversation(self.tokenizer, turns, where)
                }
            if kind == "augmented":
                tokens, mask = tokenize_augmented(self.tokenizer, record, where)
                return record["text"], {key: (tokens, mask)}
        except ValueError as exc:
            raise PreprocessError(str(exc)) from None
        texts = self._texts(record, where)
        docs = {}
        for k, text in texts.items():
            ids = self.tokenizer.tokenize(text)
            if self.opts.append_eod:
                ids.append(self.tokenizer.eod)
            docs[k] = (np.asarray(ids, dtype=np.int32), None)
        return "\n\n".join(texts.values()), docs

    def encode_line(self, path: str, lineno: int, raw: bytes, kind: str) -> tuple[str, str, dict | None]:
        """(status, where, payload): status "ok", "error", "empty" or a failed filter's name."""
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            return "error", f"{where}: malformed JSON ({msg}, column {getattr(exc, 'colno', '?')})", None
        if not isinstance(record, dict):
            return "error", f"{where}: expected a JSON object, got {type(record).__name__}", None
        try:
            text, docs = self._encode_record(record, where, kind)
        except PreprocessError as exc:
            return "error", str(exc), None
        if not text.strip():
            return "empty", where, None
        reason = self.opts.quality.reason(text) if kind == "text" else None
        if reason is not None:
            return reason, where, None
        payload = {"docs": docs, "bytes": len(raw)}
        if self.opts.dedup_exact:
            payload["hash"] = exact_hash(text)
        if self.minhasher is not None:
            payload["sig"] = self.minhasher.signature(text)
        return "ok", where, payload

    def encode_chunk(self, chunk: list) -> list:
        """encode_line over a chunk of (path, lineno, raw, kind) lines."""
        return [self.encode_line(*line) for line in chunk]


_WORKER: dict[str, Encoder] = {}


def init_worker(opts: PreprocessOptions) -> None:
    """Pool initializer: one Encoder (and tokenizer) per worker process.

    Workers drop handlers inherited from the parent: SIGTERM (sent by ``Pool.terminate``) kills
    them outright and Ctrl-C is left to the parent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["encoder"] = Encoder(opts)


def encode_chunk(chunk: list) -> list:
    """Pool task: encode a chunk with this worker's Encoder."""
    return _WORKER["encoder"].encode_chunk(chunk)


def pool_context():
    """Fork where available (workers inherit imported modules), spawn elsewhere."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def log(msg: str) -> None:
    """One line to stderr, flushed."""
    print(msg, file=sys.stderr, flush=True)


class Stats(Counter):
    """Counts of a run: docs_in, docs_out, tokens, bytes, errors, removed per reason, ..."""

    REMOVAL_KEYS = (
        "errors",
        "empty",
        "min_chars",
        "max_chars",
        "max_symbol_ratio",
        "max_repetition_ratio",
        "dup_exact",
        "dup_minhash",
    )

    def summary(self, elapsed: float) -> list[str]:
        """Human-readable lines: throughput and what each cleaning step removed."""
        el = max(elapsed, 1e-9)
        lines = [
            f"read {self['docs_in']} docs ({self['bytes'] / 1e6:.1f} MB), wrote {self['docs_out']} docs, "
            f"{self['tokens']} tokens in {elapsed:.1f}s",
            f"throughput: {self['docs_in'] / el:.0f} docs/s, {self['tokens'] / el:.0f} tokens/s, "
            f"{self['bytes'] / el / 1e6:.2f} MB/s",
            "removed: " + ", ".join(f"{k}={self[k]}" for k in self.REMOVAL_KEYS),
        ]
        extra = [
            f"{k}={self[k]}" for k in ("mixed_in", "mix_restarts", "packed_rows", "truncated") if self[k]
        ]
        if extra:
            lines.append("instruction: " + ", ".join(extra))
        return lines

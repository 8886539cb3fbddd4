"""Shared helpers of the data-pipeline tests (tiny corpora, CLI runner, tokenizers)."""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

WORDS = (
    "the of and to in is was for on that with as by at from his her an which it are this be or "
    "river mountain data model token sequence north south bright quiet"
).split()


@functools.cache
def mistral():
    """The bundled Mistral 7B tokenizer (shared by the tests of one process)."""
    from megatron_lite.data.tokenizers import build_tokenizer

    return build_tokenizer("MistralTokenizer", "bundled")


def random_text(rng: random.Random, low: int = 5, high: int = 60) -> str:
    """A few random words."""
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(rng.randint(low, high)))


def write_jsonl(path, records, gz: bool = False) -> str:
    """Write records (dicts, or raw strings written as-is) one per line."""
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """Run tools/preprocess_data.py in-process; returns (exit status, stderr)."""
    import preprocess_data

    rc = preprocess_data.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def mistral_args(inputs, prefix, *extra) -> list[str]:
    """preprocess_data flags with the bundled Mistral tokenizer."""
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return [
        "--input",
        *inputs,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "MistralTokenizer",
        "--tokenizer-model",
        "bundled",
        "--log-interval",
        "0",
        *extra,
    ]


def write_dataset(prefix, docs, dtype=np.uint16) -> str:
    """An MMIDIDX dataset with one sequence per document."""
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for d in docs:
            builder.add_document(np.asarray(d))
    return str(prefix)

"""Our .bin/.idx files against Megatron-LM's own reader and writer (megatron-core from PyPI).

Datasets written by ``tools/preprocess_data.py`` must be readable by Megatron-LM and the
reverse; this checks both directions with Megatron's real code rather than our reading of
the format.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that TE/apex are absent
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside megatron-core


def _documents(seed: int, n: int, high: int) -> list[list[np.ndarray]]:
    """Documents made of 1-3 sequences each (Megatron's sentence-split layout), some empty."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        docs.append([rng.integers(0, high, rng.integers(0, 40)) for _ in range(rng.integers(1, 4))])
    return docs


@pytest.mark.parametrize("dtype,high", [(np.uint16, 32000), (np.int32, 200_000)])
def test_megatron_reads_ours(tmp_path, dtype, high):
    docs = _documents(0, 50, high)
    with IndexedDatasetBuilder(str(tmp_path / "ours"), dtype=dtype) as builder:
        for doc in docs:
            builder.add_document(np.concatenate(doc), lengths=[len(s) for s in doc])
    theirs = mcore.IndexedDataset(str(tmp_path / "ours"))
    flat = [s for doc in docs for s in doc]
    assert len(theirs) == len(flat)
    assert list(theirs.document_indices) == list(np.cumsum([0] + [len(d) for d in docs]))
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(theirs[i], seq)
        assert theirs[i].dtype == dtype


@pytest.mark.parametrize("dtype,high", [(np.uint16, 32000), (np.int32, 200_000)])
def test_we_read_megatron(tmp_path, dtype, high):
    docs = _documents(1, 50, high)
    prefix = str(tmp_path / "theirs")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.concatenate(doc).astype(np.int64)), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    flat = [s for doc in docs for s in doc]
    assert len(ours) == len(flat)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(ours[i], seq)
    assert (Path(prefix + ".idx").read_bytes()) == _our_idx_bytes(tmp_path, docs, dtype)


def _our_idx_bytes(tmp_path: Path, docs, dtype) -> bytes:
    """The index we write for the same documents: byte-identical to Megatron's."""
    with IndexedDatasetBuilder(str(tmp_path / "same"), dtype=dtype) as builder:
        for doc in docs:
            builder.add_document(np.concatenate(doc), lengths=[len(s) for s in doc])
    return (tmp_path / "same.idx").read_bytes()


def test_preprocess_output_reads_in_megatron(tmp_path):
    """The tool's output (real Mistral tokenizer when mistral-common is present) in Megatron's reader."""
    pytest.importorskip("mistral_common")
    texts = ["Hello world, this is a test.", "", "Second document\nwith two lines."]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = [
        sys.executable,
        str(REPO / "tools/preprocess_data.py"),
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "MistralTokenizer",
        "--tokenizer-model",
        "bundled",
        "--append-eod",
        "--workers",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    prefix = str(tmp_path / "out_text_document")
    theirs, ours = mcore.IndexedDataset(prefix), IndexedDataset(prefix)
    assert len(theirs) == len(ours) > 0
    for i in range(len(ours)):
        np.testing.assert_array_equal(theirs[i], ours[i])
        assert theirs[i][-1] == 2  # Mistral's EOS closes every document (--append-eod)


def _megatron_helpers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
        from megatron.core.datasets.helpers import build_sample_idx
    return helpers_cpp, build_sample_idx


@pytest.mark.parametrize("seq_length,epochs", [(128, 3), (1000, 1), (7, 2)])
def test_sample_index_equals_megatrons(seq_length, epochs):
    """Given the same document order, samples of seq_length + 1 tokens cut exactly where Megatron cuts."""
    from megatron_lite.data import helpers

    _, megatron_sample_idx = _megatron_helpers()
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(1, 300, 200).astype(np.int32)
    doc_index = helpers.build_document_index(np.arange(200), epochs, 1, False)
    theirs = megatron_sample_idx(sizes, doc_index, seq_length, epochs, int(sizes.sum()), True, True)
    ours = helpers.build_sample_index(sizes, doc_index, seq_length, len(theirs) - 1)
    np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.int64))


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.9, 0.1], [1 / 3, 1 / 3, 1 / 3, 0.0]])
def test_blending_indices_equal_megatrons(weights):
    """The greedy blend picks the same dataset and sample for every position as Megatron's helper."""
    from megatron_lite.data import helpers

    helpers_cpp, _ = _megatron_helpers()
    w, size = np.asarray(weights, dtype=np.float64), 20_000
    dataset_index, sample_index = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, w, len(w), size, False)
    ours_dataset, ours_sample = helpers.build_blending_indices(w, size)
    np.testing.assert_array_equal(ours_dataset, dataset_index)
    np.testing.assert_array_equal(ours_sample, sample_index)

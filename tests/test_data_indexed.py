"""MMIDIDX reading/writing: byte-exact format, round trips, merging, clear errors."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from data_common import write_dataset

from megatron_lite.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    optimal_dtype,
)


def expected_idx_bytes(code: int, itemsize: int, lengths: list[int], doc_idx: list[int]) -> bytes:
    """The .idx file written by hand from the format description."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    ptr = 0
    for n in lengths:
        out += struct.pack("<q", ptr)
        ptr += n * itemsize
    return out + b"".join(struct.pack("<q", d) for d in doc_idx)


def test_bytes_match_format_spec(tmp_path):
    prefix = str(tmp_path / "tiny")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([])  # empty document
        b.add_document([7, 8, 9, 65535], lengths=[1, 3])  # one document, two sequences
        b.add_item([4])
        b.add_item([5, 6])
        b.end_document()
    idx = open(prefix + ".idx", "rb").read()
    assert idx == expected_idx_bytes(8, 2, [3, 0, 1, 3, 1, 2], [0, 1, 2, 4, 6])
    tokens = [1, 2, 3, 7, 8, 9, 65535, 4, 5, 6]
    assert open(prefix + ".bin", "rb").read() == b"".join(struct.pack("<H", t) for t in tokens)


def test_int32_bytes(tmp_path):
    prefix = write_dataset(tmp_path / "i32", [[70000, 1], [2**31 - 1]], np.int32)
    assert open(prefix + ".idx", "rb").read() == expected_idx_bytes(4, 4, [2, 1], [0, 1, 2])
    assert open(prefix + ".bin", "rb").read() == struct.pack("<3i", 70000, 1, 2**31 - 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.float32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 200, rng.integers(0, 50)).astype(dtype) for _ in range(40)]
    ds = IndexedDataset(write_dataset(tmp_path / "ds", docs, dtype))
    assert len(ds) == 40 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(41))
    long = max(range(40), key=lambda i: len(docs[i]))
    np.testing.assert_array_equal(ds.get(long, 2, 3), docs[long][2:5])
    np.testing.assert_array_equal(ds.get(long, 4), docs[long][4:])
    assert [len(x) for x in ds[3:6]] == [len(d) for d in docs[3:6]]
    np.testing.assert_array_equal(ds[-1], docs[-1])
    with pytest.raises(IndexError):
        ds[40]
    with pytest.raises(IndexError):
        ds.get(long, 1, len(docs[long]))


def test_merge_with_add_index_and_tool(tmp_path):
    a = write_dataset(tmp_path / "a", [[1, 2], [3]])
    b = write_dataset(tmp_path / "b", [[4, 5, 6], [], [7]])
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16) as m:
        m.add_index(a)
        m.add_document([9])
        m.add_index(b)
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [d.tolist() for d in ds] == [[1, 2], [3], [9], [4, 5, 6], [], [7]]
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2, 3, 4, 5, 6])
    import merge_datasets

    assert merge_datasets.main(["--input", a, b, "--output-prefix", str(tmp_path / "t")]) == 0
    merged = open(tmp_path / "t.bin", "rb").read()
    assert merged == open(a + ".bin", "rb").read() + open(b + ".bin", "rb").read()
    assert [d.tolist() for d in IndexedDataset(str(tmp_path / "t"))] == [[1, 2], [3], [4, 5, 6], [], [7]]


def test_merge_dtype_mismatch(tmp_path):
    a = write_dataset(tmp_path / "a", [[1]], np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "m"), np.uint16) as m, pytest.raises(ValueError, match="dtype"):
        m.add_index(a)


def _corrupt(tmp_path, mutate) -> str:
    prefix = write_dataset(tmp_path / "c", [[1, 2, 3], [4, 5]])
    data = bytearray(open(prefix + ".idx", "rb").read())
    mutate(data, prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(bytes(data))
    return prefix


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d, p: d.__setitem__(slice(0, 3), b"XYZ"), "bad magic"),
        (lambda d, p: d.__setitem__(slice(9, 17), struct.pack("<Q", 2)), "version 2"),
        (lambda d, p: d.__setitem__(17, 42), "dtype code 42"),
        (lambda d, p: d.__delitem__(slice(40, None)), "truncated index"),
        (lambda d, p: d.__delitem__(slice(20, None)), "truncated index header"),
        (lambda d, p: os.truncate(p + ".bin", 6), "truncated data file"),
    ],
)
def test_corrupt_files_name_the_file(tmp_path, mutate, message):
    prefix = _corrupt(tmp_path, mutate)
    with pytest.raises(ValueError, match=message) as err:
        IndexedDataset(prefix)
    assert os.path.basename(prefix) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.idx"):
        IndexedDataset(str(tmp_path / "nothere"))


def test_builder_failure_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_token_range_checked(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16) as b, pytest.raises(ValueError, match="70000"):
        b.add_document([1, 70000])


def test_optimal_dtype():
    assert optimal_dtype(32000) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(131072) == np.int32


def test_pickle_reopens_the_maps(tmp_path):
    import pickle

    ds = IndexedDataset(write_dataset(tmp_path / "p", [[1, 2], [3]]))
    again = pickle.loads(pickle.dumps(ds))
    assert [d.tolist() for d in again] == [[1, 2], [3]]

"""C++ dataset index builders == numpy references, plus their own invariants."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_lite.data import helpers
from megatron_lite.data import index_reference as ref

pytestmark = pytest.mark.skipif(helpers.compiled_helpers() is None, reason="megatron_lite._C not built")
C = helpers.compiled_helpers()
SEEDS = list(range(12))


@pytest.mark.parametrize("seed", SEEDS)
def test_document_index_matches_reference(seed):
    rng = np.random.default_rng(seed)
    docs = rng.permutation(int(rng.integers(1, 400)))
    epochs, sep = int(rng.integers(1, 5)), bool(seed % 2)
    got = C.build_document_index(docs.astype(np.int64), epochs, seed - 3, sep)
    want = ref.build_document_index(docs, epochs, seed - 3, sep)
    assert got.dtype == want.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # every epoch's documents are all there (per epoch group when the last is separate)
    np.testing.assert_array_equal(np.sort(got), np.sort(np.tile(docs, epochs)))
    if sep and epochs > 1:
        np.testing.assert_array_equal(np.sort(got[-len(docs) :]), np.sort(docs))


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_index_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(0, 40, int(rng.integers(1, 300))).astype(np.int32)
    sizes[rng.integers(len(sizes))] += 1
    doc_index = rng.permutation(np.tile(np.arange(len(sizes)), 2)).astype(np.int32)
    seq = int(rng.integers(1, 64))
    num = (int(sizes[doc_index].sum()) - 1) // seq
    got = C.build_sample_index(sizes, doc_index, seq, num)
    want = ref.build_sample_index(sizes, doc_index, seq, num)
    assert got.dtype == want.dtype == np.int64 and got.shape == (num + 1, 2)
    np.testing.assert_array_equal(got, want)
    stream = np.concatenate([np.arange(sizes[d]) + 1000 * i for i, d in enumerate(doc_index)])
    for k in range(num):  # sample k = stream[k*seq : (k+1)*seq + 1]
        (df, of), (dl, ol) = got[k], got[k + 1]
        pieces = [np.arange(sizes[doc_index[d]]) + 1000 * d for d in range(df, dl + 1)]
        pieces[-1] = pieces[-1][: ol + 1]
        pieces[0] = pieces[0][of:]
        np.testing.assert_array_equal(np.concatenate(pieces), stream[k * seq : (k + 1) * seq + 1])


def test_sample_index_needs_enough_tokens():
    sizes = np.array([3, 3], dtype=np.int32)
    with pytest.raises(ValueError, match="too few tokens"):
        C.build_sample_index(sizes, np.array([0, 1], np.int32), 2, 3)
    with pytest.raises(ValueError, match="too few tokens"):
        ref.build_sample_index(sizes, np.array([0, 1], np.int32), 2, 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_shuffle_index_matches_reference(seed):
    rng = np.random.default_rng(200 + seed)
    total = int(rng.integers(0, 3000))
    head = int(rng.integers(0, total + 1))
    got = C.build_shuffle_index(head, total, seed)
    np.testing.assert_array_equal(got, ref.build_shuffle_index(head, total, seed))
    np.testing.assert_array_equal(np.sort(got[:head]), np.arange(head))
    np.testing.assert_array_equal(np.sort(got[head:]), np.arange(head, total))


@pytest.mark.parametrize("seed", SEEDS)
def test_blending_matches_reference_and_weights(seed):
    rng = np.random.default_rng(300 + seed)
    w = rng.random(int(rng.integers(1, 6))) + 0.01
    w /= w.sum()
    size = 5000
    di, dsi = C.build_blending_indices(w, size)
    rdi, rdsi = ref.build_blending_indices(w, size)
    assert di.dtype == rdi.dtype == np.int16
    np.testing.assert_array_equal(di, rdi)
    np.testing.assert_array_equal(dsi, rdsi)
    frac = np.bincount(di, minlength=len(w)) / size
    np.testing.assert_allclose(frac, w, atol=0.01)
    for d in range(len(w)):  # each dataset's samples are consumed in order 0, 1, 2, ...
        np.testing.assert_array_equal(dsi[di == d], np.arange((di == d).sum()))
    prefix = np.bincount(di[:500], minlength=len(w)) / 500  # greedy: every prefix is balanced too
    np.testing.assert_allclose(prefix, w, atol=0.01)


@pytest.mark.parametrize("seed", SEEDS)
def test_ffd_matches_reference_and_is_valid(seed):
    rng = np.random.default_rng(400 + seed)
    cap = int(rng.integers(8, 200))
    lengths = rng.integers(0, cap + 1, int(rng.integers(0, 300)))
    got = C.ffd_pack(lengths, cap)
    np.testing.assert_array_equal(got, ref.ffd_pack(lengths, cap))
    if len(lengths) == 0:
        return
    load = np.bincount(got, weights=lengths)
    assert load.max() <= cap
    assert np.unique(got).tolist() == list(range(got.max() + 1))  # bins opened in order
    # first fit decreasing never needs more than 11/9 OPT + 6/9 bins; OPT >= ceil(sum / cap)
    assert got.max() + 1 <= 11 / 9 * np.ceil(lengths.sum() / cap) + 1


def test_ffd_rejects_oversized_item():
    with pytest.raises(ValueError, match="length 11"):
        C.ffd_pack(np.array([3, 11]), 10)


def test_wrappers_dispatch_to_compiled():
    docs = np.arange(10)
    np.testing.assert_array_equal(
        helpers.build_document_index(docs, 2, 7, False), ref.build_document_index(docs, 2, 7, False)
    )
    np.testing.assert_array_equal(helpers.ffd_pack([5, 4, 3], 8), [0, 1, 0])

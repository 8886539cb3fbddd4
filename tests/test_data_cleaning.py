"""Cleaning before tokenization: quality filters, exact hashes, MinHash estimates and LSH.

References: the filters' ratios computed by hand; MinHash signatures against the exact Jaccard
similarity of the word 5-gram sets (the estimate's standard error is sqrt(J(1-J)/num_perm)).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from megatron_lite.data.cleaning import (
    MinHasher,
    MinHashLSH,
    QualityFilter,
    choose_bands_rows,
    exact_hash,
    repetition_ratio,
    symbol_ratio,
)

WORDS = [f"w{i}" for i in range(5000)]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t):
        w = t.split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_ratios_by_hand():
    assert symbol_ratio("ab !! cd") == pytest.approx(2 / 6)
    assert symbol_ratio("   ") == 0.0
    assert repetition_ratio("a b c a b c a b c") == pytest.approx(1 - 3 / 7)  # 7 trigrams, 3 distinct
    assert repetition_ratio("only two") == 0.0


def test_quality_filter_reasons_in_order():
    f = QualityFilter(min_chars=5, max_chars=50, max_symbol_ratio=0.3, max_repetition_ratio=0.5)
    assert f.reason("tiny") == "min_chars"
    assert f.reason("x" * 51) == "max_chars"
    assert f.reason("#### $$$$ ok") == "max_symbol_ratio"
    assert f.reason("la la la la la la la la") == "max_repetition_ratio"
    assert f.reason("a perfectly ordinary sentence") is None
    assert QualityFilter().reason("") is None  # every check disabled


def test_exact_hash_is_content_only():
    assert exact_hash("same text") == exact_hash("same text")
    assert exact_hash("same text") != exact_hash("same text ")
    assert len(exact_hash("x")) == 16


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256, ngram=5, seed=1)
    base = _text(rng, 400).split()
    for keep in (1.0, 0.9, 0.6, 0.3):
        other = [w if rng.random() < keep else rng.choice(WORDS) for w in base]
        a, b = " ".join(base), " ".join(other)
        truth = _jaccard(a, b)
        estimate = float(np.mean(hasher.signature(a) == hasher.signature(b)))
        assert abs(estimate - truth) <= 4 * max(np.sqrt(truth * (1 - truth) / 256), 0.01), (keep, truth)
    assert np.array_equal(hasher.signature(" ".join(base)), MinHasher(256, 5, 1).signature(" ".join(base)))


def test_choose_bands_rows_puts_the_threshold_on_the_s_curve():
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = choose_bands_rows(threshold, 128)
        assert bands * rows <= 128
        midpoint = (1 / bands) ** (1 / rows)  # where the candidate probability crosses ~1/2
        assert abs(midpoint - threshold) < 0.12, (threshold, bands, rows)
    with pytest.raises(ValueError, match="threshold"):
        choose_bands_rows(1.0, 128)


def test_lsh_finds_near_duplicates_and_keeps_distinct_texts():
    rng = random.Random(1)
    hasher = MinHasher(num_perm=128)
    lsh = MinHashLSH(0.7, *choose_bands_rows(0.7, 128))
    originals = [_text(rng, 300) for _ in range(30)]
    assert not any(lsh.is_duplicate_or_add(hasher.signature(t)) for t in originals)  # all distinct
    near = []
    for t in originals[:10]:  # change one word in 100: Jaccard about 0.95
        words = t.split()
        for i in range(0, len(words), 100):
            words[i] = rng.choice(WORDS)
        near.append(" ".join(words))
    assert all(lsh.is_duplicate_or_add(hasher.signature(t)) for t in near)
    assert not lsh.is_duplicate_or_add(hasher.signature(_text(rng, 300)))
    with pytest.raises(ValueError, match="bands\\*rows"):
        lsh.is_duplicate_or_add(np.zeros(3, dtype=np.uint32))

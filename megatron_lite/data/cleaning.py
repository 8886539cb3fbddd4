"""Corpus cleaning for preprocessing: quality filters, exact and MinHash-LSH near-duplicate removal.

Filters follow the spirit of Gopher/Dolma/Pile heuristics. Signatures are computed in worker
processes (pure functions of the text); the dedup state lives in the main process.

MinHash: shingles are word n-grams of the lower-cased text, hashed with a vectorised polynomial
rolling hash (numpy uint64, wrapping); each of ``num_perm`` hash functions is a
multiply-shift hash ``(a * x + b) >> 32`` of the shingle hash, and the signature is the minimum
per function. LSH splits the signature into ``bands`` of ``rows``; documents sharing a band are
candidates, and a candidate is a duplicate when its estimated Jaccard similarity (fraction of
equal signature entries) reaches the threshold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_SYMBOL = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE_BYTES = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)
_P = 0x100000001B3  # odd multiplier of the byte-polynomial hash
_P_INV = pow(_P, -1, 1 << 64)
_Q = 0x9E3779B97F4A7C15  # odd multiplier combining word hashes into n-gram hashes
_EMPTY_MIN = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class QualityFilter:
    """Document-level quality thresholds; None disables a check."""

    min_chars: int | None = None
    max_chars: int | None = None
    max_symbol_ratio: float | None = None
    max_repetition_ratio: float | None = None

    def reason(self, text: str) -> str | None:
        """Name of the first failed check (``"min_chars"``, ...) or None when the text passes."""
        n = len(text)
        if self.min_chars is not None and n < self.min_chars:
            return "min_chars"
        if self.max_chars is not None and n > self.max_chars:
            return "max_chars"
        if self.max_symbol_ratio is not None and symbol_ratio(text) > self.max_symbol_ratio:
            return "max_symbol_ratio"
        if self.max_repetition_ratio is not None and repetition_ratio(text) > self.max_repetition_ratio:
            return "max_repetition_ratio"
        return None


def symbol_ratio(text: str) -> float:
    """Fraction of non-whitespace characters that are neither letters, digits nor underscore."""
    visible = sum(map(len, text.split()))
    return len(_SYMBOL.findall(text)) / visible if visible else 0.0


def repetition_ratio(text: str, n: int = 3) -> float:
    """Fraction of word ``n``-grams that repeat an earlier one (0 for texts under ``n`` words)."""
    words = text.split()
    total = len(words) - n + 1
    if total <= 1:
        return 0.0
    grams = {tuple(words[i : i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def exact_hash(text: str) -> bytes:
    """128-bit content hash of the exact text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


_IS_WORD_BYTE = np.ones(256, dtype=np.int8)
_IS_WORD_BYTE[_SPACE_BYTES] = 0
_POWERS = {"p": np.ones(1, dtype=np.uint64), "inv": np.ones(1, dtype=np.uint64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k (mod 2^64) for k <= n, cached and grown by doubling."""
    if _POWERS["p"].size <= n:
        size = max(2 * n, 4096)
        _POWERS["p"] = np.cumprod(np.concatenate([np.ones(1, np.uint64), np.full(size, _P, np.uint64)]))
        _POWERS["inv"] = np.cumprod(np.concatenate([np.ones(1, np.uint64), np.full(size, _P_INV, np.uint64)]))
    return _POWERS["p"], _POWERS["inv"]


def word_ngram_hashes(text: str, ngram: int, unique: bool = True) -> np.ndarray:
    """uint64 hashes of the lower-cased word ``ngram``-grams of ``text`` (all words if fewer).

    Args:
        text: document.
        ngram: words per shingle.
        unique: drop repeated shingles (MinHash does not need it).
    """
    b = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    is_word = np.zeros(b.size + 2, dtype=np.int8)
    is_word[1:-1] = _IS_WORD_BYTE[b]
    edges = np.diff(is_word)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # word [start, end)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    # prefix[i] = sum_{k < i} b[k] * P^k, so word hash = (prefix[e] - prefix[s]) * P^-s
    powers, inv_powers = _powers(b.size)
    prefix = np.zeros(b.size + 1, dtype=np.uint64)
    np.cumsum(b * powers[: b.size], out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * inv_powers[starts]  # [num_words]
    n = min(ngram, words.size)
    grams = np.zeros(words.size - n + 1, dtype=np.uint64)
    for u in range(n):  # shingle = sum_u word[t + u] * Q^(n - u)
        grams += words[u : u + grams.size]
        grams *= np.uint64(_Q)
    return np.unique(grams) if unique else grams


class MinHasher:
    """MinHash signatures (uint32 [num_perm]) over word n-gram shingles.

    Args:
        num_perm: hash functions (signature length).
        ngram: words per shingle.
        seed: picks the hash functions.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"minhash num_perm ({num_perm}) and ngram ({ngram}) must be >= 1")
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        self.ngram = ngram
        self.num_perm = num_perm

    def signature(self, text: str, chunk: int = 4096) -> np.ndarray:
        """uint32 [num_perm] signature; all 0xFFFFFFFF for a text without words."""
        grams = word_ngram_hashes(text, self.ngram, unique=False)
        sig = np.full(self.num_perm, _EMPTY_MIN, dtype=np.uint64)
        for s in range(0, grams.size, chunk):
            h = np.multiply.outer(self.a, grams[s : s + chunk])  # [num_perm, chunk]
            h += self.b[:, None]
            h >>= np.uint64(32)
            np.minimum(sig, h.min(axis=1), out=sig)
        return sig.astype(np.uint32)


def choose_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """LSH (bands, rows) with bands * rows <= num_perm minimising false positives + negatives."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"minhash threshold must lie in (0, 1), got {threshold}")
    s = np.linspace(0.0, 1.0, 401)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1.0 - (1.0 - s**rows) ** bands  # probability of becoming a candidate
        err = np.trapezoid(np.where(s < threshold, p, 1.0 - p), s)
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class MinHashLSH:
    """Near-duplicate index over MinHash signatures of the documents kept so far.

    Args:
        threshold: estimated Jaccard similarity at or above which a document is a duplicate.
        bands, rows: LSH layout; ``bands * rows`` signature entries are used.
    """

    def __init__(self, threshold: float, bands: int, rows: int):
        self.threshold = threshold
        self.bands, self.rows = bands, rows
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._signatures: list[np.ndarray] = []

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        used = sig[: self.bands * self.rows].reshape(self.bands, self.rows)
        return [row.tobytes() for row in used]

    def is_duplicate_or_add(self, sig: np.ndarray) -> bool:
        """True when ``sig`` is near an indexed signature; otherwise index it and return False."""
        if sig.size < self.bands * self.rows:
            raise ValueError(
                f"signature has {sig.size} entries, LSH needs bands*rows = {self.bands * self.rows}"
            )
        keys = self._keys(sig)
        seen: set[int] = set()
        for table, key in zip(self._tables, keys):
            for cand in table.get(key, ()):
                if cand not in seen:
                    seen.add(cand)
                    if float(np.mean(self._signatures[cand] == sig)) >= self.threshold:
                        return True
        slot = len(self._signatures)
        self._signatures.append(sig)
        for table, key in zip(self._tables, keys):
            table.setdefault(key, []).append(slot)
        return False

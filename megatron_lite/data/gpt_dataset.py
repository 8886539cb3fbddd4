"""GPTDataset: fixed-length training samples over a split of an indexed token dataset.

Megatron semantics: the split's documents are repeated for as many epochs as the requested
sample count needs, shuffled per epoch group (document index), cut into samples of
``seq_length + 1`` tokens that cross document boundaries (sample index; consecutive samples share
one token) and served in a shuffled order (shuffle index). When the last epoch is used only in
small part (< 80% of an epoch's samples) it is shuffled apart so its samples are not spread
over the whole run.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron_lite.data import helpers
from megatron_lite.data.index_cache import description_hash, load_or_build
from megatron_lite.data.indexed_dataset import DatasetError, IndexedDataset, dataset_exists

SPLIT_NAMES = ("train", "valid", "test")
INDEX_NAMES = ["document_index", "sample_index", "shuffle_index"]


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"969/30/1"``) -> three normalised weights; missing ones are 0."""
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"split {split!r} is not a comma-separated list of numbers") from None
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"split {split!r} needs 1 to 3 non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(weights: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous document ranges ``[start, stop)`` of each split (Megatron's rounding)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [0] + [min(max(b - diff, 0), num_documents) for b in bounds[1:]]
    return [(bounds[i], max(bounds[i], bounds[i + 1])) for i in range(len(weights))]


def loss_mask_prefix(prefix: str) -> str | None:
    """Prefix of the loss-mask dataset stored beside ``<p>_<key>_document`` (``<p>_<key>_loss_mask``)."""
    candidates = [prefix + "_loss_mask"]
    if prefix.endswith("_document"):
        candidates.insert(0, prefix[: -len("_document")] + "_loss_mask")
    for cand in candidates:
        if dataset_exists(cand):
            return cand
    return None


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest epoch count whose tokens give ``num_samples`` samples of ``seq_length + 1``."""
    if tokens_per_epoch <= 0:
        raise DatasetError("the split has no tokens: cannot build samples from it")
    # (epochs * tokens_per_epoch - 1) // seq_length >= num_samples
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_indices(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Document, sample and shuffle indices of one GPTDataset.

    Args:
        sizes: int32 [S] tokens of every sequence of the indexed dataset.
        documents: int64 [n] sequence ids in this split.
        seq_length: tokens per sample minus one.
        num_samples: samples requested (the index holds at least this many).
        seed: shuffling seed.
    """
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate_final_epoch = False
    sans_final = 0
    if num_epochs > 1:
        sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        from_final = num_samples - sans_final
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = from_final < int(0.80 * per_epoch)
    document_index = helpers.build_document_index(documents, num_epochs, seed, separate_final_epoch)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_index = helpers.build_sample_index(sizes, document_index, seq_length, total)
    shuffle_index = helpers.build_shuffle_index(sans_final if separate_final_epoch else total, total, seed)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """Samples ``{"tokens": int64 [seq_length + 1]}`` (+ ``"loss_mask"`` float32 when stored).

    Args:
        prefix: indexed dataset prefix (``<p>_<key>_document``).
        documents: int64 [n] sequence ids of this split.
        seq_length: model sequence length (samples hold one more token for the labels).
        num_samples: samples requested; ``len`` is at least this (whole epochs are indexed).
        seed: shuffling seed.
        cache_dir: index cache directory (None: build in memory).
        split_name: tag for the cache files and the description.
        group: torch.distributed group whose rank 0 builds the cache.
        force_loss_mask: add an all-ones loss mask when the data stores none (blends).
    """

    def __init__(
        self,
        prefix: str,
        documents: np.ndarray,
        seq_length: int,
        num_samples: int,
        seed: int,
        cache_dir: str | None = None,
        split_name: str = "train",
        group=None,
        force_loss_mask: bool = False,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.prefix = prefix
        self.indexed = IndexedDataset(prefix)
        self.seq_length = seq_length
        self.documents = np.asarray(documents, dtype=np.int64)
        mask_prefix = loss_mask_prefix(prefix)
        self.loss_masks = IndexedDataset(mask_prefix) if mask_prefix else None
        if self.loss_masks is not None and not np.array_equal(
            self.loss_masks.sequence_lengths, self.indexed.sequence_lengths
        ):
            raise DatasetError(f"{mask_prefix}: loss-mask sequence lengths differ from {prefix}")
        self.has_loss_mask = self.loss_masks is not None or force_loss_mask
        self.description = {
            "class": "GPTDataset",
            "format_version": 1,
            "prefix": os.path.abspath(prefix),
            "num_sequences": len(self.indexed),
            "num_tokens": self.indexed.num_tokens,
            "split": split_name,
            "num_documents": len(self.documents),
            "documents_md5": hashlib.md5(self.documents.tobytes()).hexdigest(),
            "seq_length": seq_length,
            "num_samples": int(num_samples),
            "seed": int(seed),
        }
        self.unique_id = description_hash(self.description)
        tokens_per_epoch = int(self.indexed.sequence_lengths[self.documents].sum(dtype=np.int64))
        # > 1: the split is smaller than the run needs and its documents repeat (the caller warns)
        self.num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples) if num_samples else 1
        build = lambda: build_indices(
            self.indexed.sequence_lengths, self.documents, seq_length, num_samples, seed
        )
        arrays = load_or_build(
            cache_dir, f"GPTDataset-{split_name}", self.description, INDEX_NAMES, build, group
        )
        self.document_index = arrays["document_index"]  # int32 [n * epochs]
        self.sample_index = arrays["sample_index"]  # int64 [samples + 1, 2]
        self.shuffle_index = arrays["shuffle_index"]  # int64 [samples]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def _gather(self, source: IndexedDataset, idx: int) -> np.ndarray:
        (doc_f, off_f), (doc_l, off_l) = self.sample_index[idx], self.sample_index[idx + 1]
        doc_f, off_f, doc_l, off_l = int(doc_f), int(off_f), int(doc_l), int(off_l)
        if doc_f == doc_l:
            return source.get(int(self.document_index[doc_f]), off_f, off_l - off_f + 1)
        pieces = [source.get(int(self.document_index[doc_f]), off_f)]
        pieces += [source.get(int(self.document_index[d])) for d in range(doc_f + 1, doc_l)]
        pieces.append(source.get(int(self.document_index[doc_l]), 0, off_l + 1))
        return np.concatenate(pieces)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.prefix} ({len(self)} samples)")
        sample = int(self.shuffle_index[idx])
        item = {"tokens": self._gather(self.indexed, sample).astype(np.int64)}  # [seq_length + 1]
        if self.loss_masks is not None:
            item["loss_mask"] = self._gather(self.loss_masks, sample).astype(np.float32)
        elif self.has_loss_mask:
            item["loss_mask"] = np.ones(self.seq_length + 1, dtype=np.float32)
        return item

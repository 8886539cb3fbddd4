"""Preference pairs (DPO) over a paired indexed dataset.

``tools/preprocess_data.py --preference`` writes ``<p>_<key>_document`` and
``<p>_<key>_loss_mask`` with the chosen and rejected conversations of pair ``i`` as sequences
``2i`` and ``2i + 1`` (same prompt tokens; mask 1 on the response and its EOD). A sample here is
one whole pair, padded (mask 0) or truncated to ``seq_length + 1`` tokens per row, so the batch
layout (``data.batching.collate_samples``) keeps the two rows of a pair together.

The reference model's summed log-probabilities live beside the data in
``<p>_<key>_ref_logps.npz`` (``logps`` fp32 ``[pairs, 2]``, the ``seq_length`` they were
computed at), written once by ``training.reference`` (see ``training/objectives.py`` for why
they are precomputed).
"""

from __future__ import annotations

import os

import numpy as np

from megatron_lite.data.gpt_dataset import loss_mask_prefix
from megatron_lite.data.indexed_dataset import DatasetError, IndexedDataset


def ref_logps_path(prefix: str) -> str:
    """The sidecar of reference log-probabilities of dataset ``prefix``."""
    base = prefix[: -len("_document")] if prefix.endswith("_document") else prefix
    return base + "_ref_logps.npz"


def load_ref_logps(prefix: str, num_pairs: int, seq_length: int) -> np.ndarray | None:
    """fp32 ``[pairs, 2]`` from the sidecar, or None when there is none.

    Raises:
        DatasetError: the sidecar belongs to other data or another ``data.seq_length``.
    """
    path = ref_logps_path(prefix)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        logps, seq = f["logps"].astype(np.float32), int(f["seq_length"])
    if logps.shape != (num_pairs, 2):
        raise DatasetError(
            f"{path}: holds {logps.shape} log-probs, the data has {num_pairs} pairs; delete it"
        )
    if seq != seq_length:
        raise DatasetError(
            f"{path}: computed at seq_length {seq}, data.seq_length is {seq_length}; delete it to recompute"
        )
    return logps


def save_ref_logps(prefix: str, logps: np.ndarray, seq_length: int) -> str:
    """Write the sidecar atomically (a temporary name renamed into place); returns its path."""
    path = ref_logps_path(prefix)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, logps=np.asarray(logps, dtype=np.float32), seq_length=np.int64(seq_length))
    os.replace(tmp, path)
    return path


class PreferenceDataset:
    """Shuffled pairs of one split: items ``tokens`` int64 ``[2, s+1]``, ``loss_mask`` float32
    ``[2, s+1]`` and (once set) ``ref_logps`` float32 ``[2]``.

    Args:
        prefix: paired dataset prefix (``<p>_<key>_document``).
        pairs: int64 ``[n]`` pair ids of this split.
        seq_length: model sequence length (rows hold one more token for the labels).
        num_samples: pairs requested; the split repeats (reshuffled each epoch) to give them.
        seed: shuffling seed.
        pad_id: token of the padding (its loss mask is 0).
    """

    def __init__(
        self, prefix: str, pairs: np.ndarray, seq_length: int, num_samples: int, seed: int, pad_id: int
    ):
        self.prefix, self.seq_length, self.pad_id = prefix, seq_length, pad_id
        self.indexed = IndexedDataset(prefix)
        mask_prefix = loss_mask_prefix(prefix)
        if mask_prefix is None:
            raise DatasetError(f"{prefix}: no loss-mask dataset beside it; preprocess with --preference")
        self.masks = IndexedDataset(mask_prefix)
        if len(self.indexed) % 2 or not np.array_equal(
            self.masks.sequence_lengths, self.indexed.sequence_lengths
        ):
            raise DatasetError(
                f"{prefix}: not a preference dataset ({len(self.indexed)} sequences; pairs need an even "
                "count and a loss mask of the same lengths); preprocess with --preference"
            )
        self.num_pairs = len(self.indexed) // 2
        self.pairs = np.asarray(pairs, dtype=np.int64)
        epochs = -(-int(num_samples) // len(self.pairs)) if len(self.pairs) and num_samples else 1
        self.num_epochs = epochs
        rng = np.random.default_rng([seed, 4099])
        self.order = np.concatenate([rng.permutation(self.pairs) for _ in range(epochs)])  # [epochs * n]
        self.ref_logps: np.ndarray | None = None  # fp32 [num_pairs, 2], set by training.reference

    def __len__(self) -> int:
        return len(self.order)

    def _row(self, source: IndexedDataset, seq: int, fill: int, dtype) -> np.ndarray:
        row = np.full(self.seq_length + 1, fill, dtype=dtype)  # [s + 1]
        data = source.get(seq)[: self.seq_length + 1]  # truncated: the end of the response goes
        row[: len(data)] = data
        return row

    def pair(self, p: int) -> dict[str, np.ndarray]:
        """Pair ``p`` (by id, unshuffled): ``tokens`` ``[2, s+1]`` and ``loss_mask`` ``[2, s+1]``."""
        rows = (2 * int(p), 2 * int(p) + 1)
        return {
            "tokens": np.stack([self._row(self.indexed, r, self.pad_id, np.int64) for r in rows]),
            "loss_mask": np.stack([self._row(self.masks, r, 0, np.float32) for r in rows]),
        }

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        p = int(self.order[idx])
        item = self.pair(p)
        if self.ref_logps is None:
            raise DatasetError(f"{self.prefix}: reference log-probabilities were not computed")
        item["ref_logps"] = self.ref_logps[p]  # [2]
        return item

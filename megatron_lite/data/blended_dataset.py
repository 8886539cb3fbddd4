"""BlendedDataset: a weighted mixture of datasets with Megatron's greedy interleaving.

Sample ``i`` of the blend comes from the dataset whose achieved fraction lags its weight the
most after ``i`` samples (``weight * max(i, 1) - picked`` largest, first on ties), so any prefix
of the blend matches the weights to within one sample per dataset. The rule is deterministic:
a run resumed from ``consumed_samples`` sees exactly the samples it would have seen.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_lite.data import helpers
from megatron_lite.data.index_cache import description_hash, load_or_build
from megatron_lite.data.indexed_dataset import DatasetError

SIZE_MARGIN = 1.005  # each component is asked for 0.5% more samples than its share


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """``["0.7", "a", "0.3", "b"]`` -> (["a", "b"], [0.7, 0.3]); ``["a"]`` or ``["a", "b"]`` -> weights None.

    Raises:
        DatasetError (a ValueError): mixed or odd weight/prefix lists, weights that are negative,
            not finite or all zero.
    """
    if not paths:
        raise DatasetError("data paths are empty: give a prefix or a weight/prefix list")

    def is_number(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if not any(is_number(p) for p in paths):
        return list(paths), None
    if len(paths) % 2 or not all(is_number(w) for w in paths[0::2]):
        raise DatasetError(
            f"data paths {paths} must alternate weight and prefix: ['0.7', 'prefA', '0.3', 'prefB']"
        )
    weights = [float(w) for w in paths[0::2]]
    if not all(math.isfinite(w) for w in weights) or min(weights) < 0 or sum(weights) <= 0:
        raise DatasetError(
            f"blend weights {weights} (data.path) must be finite, non-negative, with a positive sum"
        )
    return list(paths[1::2]), weights


def normalize(weights: list[float]) -> list[float]:
    """Weights scaled to sum to 1."""
    total = float(sum(weights))
    return [w / total for w in weights]


def component_sizes(weights: list[float], size: int) -> list[int]:
    """Samples to request from each component of a blend of ``size`` (with the 0.5% margin)."""
    return [int(math.ceil(math.ceil(size * w) * SIZE_MARGIN)) for w in normalize(weights)]


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Args:
        datasets: component datasets (each with ``unique_id``, ``__len__``, ``__getitem__``).
        weights: relative weights (normalised here).
        size: samples in the blend.
        cache_dir: index cache directory (None: build in memory).
        group: torch.distributed group whose rank 0 builds the cache.
    """

    def __init__(
        self, datasets: list, weights: list[float], size: int, cache_dir: str | None = None, group=None
    ):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        self.description = {
            "class": "BlendedDataset",
            "datasets": [d.unique_id for d in datasets],
            "weights": self.weights,
            "size": self.size,
        }
        self.unique_id = description_hash(self.description)
        build = lambda: dict(
            zip(
                ("dataset_index", "dataset_sample_index"),
                helpers.build_blending_indices(self.weights, self.size),
            )
        )
        arrays = load_or_build(
            cache_dir,
            "BlendedDataset",
            self.description,
            ["dataset_index", "dataset_sample_index"],
            build,
            group,
        )
        self.dataset_index = arrays["dataset_index"]  # int16 [size]
        self.dataset_sample_index = arrays["dataset_sample_index"]  # int64 [size]
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.size == 0:
            return
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (count, ds) in enumerate(zip(counts, self.datasets)):
            if count > len(ds):
                raise DatasetError(f"blend needs {count} samples from dataset {d} which has only {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]

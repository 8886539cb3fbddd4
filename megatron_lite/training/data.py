"""Training data: datasets (real or mock), and resumable streams of global batches for this rank.

A stream is positioned by the number of samples the whole job has consumed, so resuming from a
checkpoint continues with exactly the samples the uninterrupted run would have seen. Each rank
takes its data-parallel slice with Megatron's sampler (microbatch ``j`` of DP rank ``r`` in a
global batch starting at sample ``c`` is ``c + (j * dp + r) * mbs ... + mbs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from megatron_lite.config import Config, ConfigError


class MockGPTDataset:
    """Deterministic random tokens with a pattern a model can learn (smoke tests, benchmarks).

    A random cyclic order of the tokens ``1 .. vocab-1`` is drawn from ``seed``; sample ``i`` reads
    ``seq_length + 1`` consecutive tokens of that cycle (wrapping around) from a start drawn from
    ``(seed, split, i)``. The pattern (each token's successor) is shared by all splits, so validation
    loss falls with training loss; any sample can be produced in any order on any rank. Token 0 is
    never drawn and serves as the EOD id.
    """

    eod = 0

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int, split: int = 0):
        self.num_samples, self.seq_length, self.seed, self.split = num_samples, seq_length, seed, split
        self.cycle = np.random.default_rng([seed, 7919]).permutation(np.arange(1, vocab_size, dtype=np.int64))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        start = int(np.random.default_rng([self.seed, self.split, int(idx)]).integers(len(self.cycle)))
        pos = (start + np.arange(self.seq_length + 1)) % len(self.cycle)
        return {"tokens": self.cycle[pos]}


def sample_counts(cfg: Config) -> tuple[int, int, int]:
    """Samples each split must provide (Megatron): train, every evaluation's, one test pass."""
    tr = cfg.training
    gbs = tr.global_batch_size
    evals = (tr.train_iters // tr.eval_interval + 1) * tr.eval_iters if tr.eval_interval else 0
    return tr.train_iters * gbs, evals * gbs, tr.eval_iters * gbs


def build_datasets(cfg: Config, group=None) -> tuple[Any, Any, Any, int]:
    """(train, valid, test, eod id); valid/test may be None when the split gives them no weight."""
    train_n, valid_n, test_n = sample_counts(cfg)
    seq, seed = cfg.data.seq_length, cfg.training.seed
    if cfg.data.mock:
        vocab = cfg.model.vocab_size
        return (
            MockGPTDataset(train_n, seq, vocab, seed, 0),
            MockGPTDataset(valid_n, seq, vocab, seed, 1),
            MockGPTDataset(test_n, seq, vocab, seed, 2),
            MockGPTDataset.eod,
        )
    from megatron_lite.data.builder import build_gpt_datasets
    from megatron_lite.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds model.vocab_size ({cfg.model.vocab_size})"
        )
    train, valid, test = build_gpt_datasets(
        cfg.data.path,
        cfg.data.split,
        seq,
        (train_n, valid_n, test_n),
        seed,
        cache_dir=cfg.data.cache_dir,
        group=group,
    )
    return train, valid, test, tokenizer.eod


class BatchStream:
    """This rank's microbatches of successive global batches from ``dataset``.

    Args:
        dataset: items ``{"tokens": int64[seq + 1]}`` (+ optional ``"loss_mask"`` float[seq + 1]).
        consumed_samples: samples of the whole job already used (resume point).
        micro_batch_size: samples per microbatch.
        num_microbatches: microbatches per global batch on each rank.
        dp_rank, dp_size: this rank's data-parallel slice.
        data_cfg: ``DataConfig`` (packing / EOD handling flags).
        eod: end-of-document token id.
        device: where batches are placed.
    """

    def __init__(
        self,
        dataset,
        consumed_samples: int,
        micro_batch_size: int,
        num_microbatches: int,
        dp_rank: int,
        dp_size: int,
        data_cfg,
        eod: int,
        device: torch.device,
    ):
        from megatron_lite.data.sampler import MegatronPretrainingSampler

        self.dataset = dataset
        self.consumed_samples = consumed_samples
        self.global_batch_size = micro_batch_size * num_microbatches * dp_size
        self.num_microbatches = num_microbatches
        self.data_cfg, self.eod, self.device = data_cfg, eod, device
        self._indices = iter(
            MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
        )

    def next(self) -> list:
        """The next global batch: ``num_microbatches`` ``Batch`` objects on ``device``."""
        batches = []
        for _ in range(self.num_microbatches):
            try:
                idx = next(self._indices)
            except StopIteration:
                raise RuntimeError(
                    f"dataset exhausted after {self.consumed_samples} samples ({len(self.dataset)} available)"
                ) from None
            batches.append(self._collate(idx))
        self.consumed_samples += self.global_batch_size
        return batches

    def _collate(self, idx: list[int]):
        from megatron_lite.data.batching import collate_samples, make_batch

        samples = collate_samples([self.dataset[i] for i in idx])
        d = self.data_cfg
        batch = make_batch(
            samples["tokens"],
            self.eod,
            d.reset_position_ids,
            d.reset_attention_mask,
            d.eod_mask_loss,
            sample_loss_mask=samples.get("loss_mask"),
        )
        return to_device(batch, self.device)


def to_device(batch, device: torch.device):
    """Copy every tensor field of a dataclass/namedtuple ``Batch`` to ``device`` (non-blocking)."""

    def move(v):
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        )
    return type(batch)(*(move(v) for v in batch))

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
from megatron_lite.data.indexed_dataset import DatasetError
from megatron_lite.parallel.context import shard_batch


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
    from megatron_lite.data.blended_dataset import parse_blend

    prefixes, _ = parse_blend(list(cfg.data.path))
    check_dataset_vocab(prefixes, cfg.model.vocab_size)
    check_objective_data(cfg, prefixes)
    if cfg.training.objective == "dpo":
        return (*build_preference_datasets(cfg, prefixes[0], tokenizer.pad), tokenizer.eod)
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


def check_objective_data(cfg: Config, prefixes: list[str]) -> None:
    """sft needs loss masks beside every dataset; dpo one preference dataset (no blend)."""
    from megatron_lite.data.gpt_dataset import loss_mask_prefix

    objective = cfg.training.objective
    if objective == "sft":
        for prefix in prefixes:
            if loss_mask_prefix(prefix) is None:
                raise DatasetError(
                    f"{prefix}: training.objective sft needs loss masks but no loss-mask dataset lies beside "
                    "it; preprocess with --instruction (or use training.objective pretrain)"
                )
    if objective == "dpo" and len(prefixes) != 1:
        raise ConfigError(
            f"training.objective dpo reads one preference dataset, data.path names {len(prefixes)}"
        )


def build_preference_datasets(cfg: Config, prefix: str, pad_id: int):
    """(train, valid, test) ``PreferenceDataset``s of the pairs split by ``data.split``."""
    from megatron_lite.data.gpt_dataset import parse_split, split_ranges
    from megatron_lite.data.preference import PreferenceDataset

    counts = sample_counts(cfg)
    probe = PreferenceDataset(prefix, np.arange(1), cfg.data.seq_length, 1, 0, pad_id)  # validates
    out = []
    for (start, stop), n in zip(split_ranges(parse_split(cfg.data.split), probe.num_pairs), counts):
        if n == 0 or stop <= start:
            out.append(None)
            continue
        pairs = np.arange(start, stop, dtype=np.int64)
        out.append(PreferenceDataset(prefix, pairs, cfg.data.seq_length, n, cfg.training.seed, pad_id))
    return tuple(out)


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
        vocab_size: token ids must lie below it (checked on the host for every microbatch: one
            max over the tokens, before an embedding lookup fails or silently reads padding);
            None skips the check.
        cycle: start again at sample 0 when the dataset runs out (validation: a resumed run with
            another ``eval_interval`` may have consumed more than this run's split holds).
        context: (cp rank, cp size): keep this context-parallel rank's two chunks of every
            sequence (``parallel.context.shard_batch``); all cp ranks read the same samples.
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
        vocab_size: int | None = None,
        cycle: bool = False,
        context: tuple[int, int] = (0, 1),
    ):
        self.dataset = dataset
        self.global_batch_size = micro_batch_size * num_microbatches * dp_size
        self.num_microbatches = num_microbatches
        self.data_cfg, self.eod, self.device = data_cfg, eod, device
        self.vocab_size, self.cycle = vocab_size, cycle
        self.context = context
        self._sampler_args = (micro_batch_size, dp_rank, dp_size)
        if cycle and consumed_samples >= len(dataset):
            consumed_samples = 0
        self.consumed_samples = consumed_samples
        self._indices = self._sampler(consumed_samples)

    def _sampler(self, consumed_samples: int):
        from megatron_lite.data.sampler import MegatronPretrainingSampler

        return iter(MegatronPretrainingSampler(len(self.dataset), consumed_samples, *self._sampler_args))

    def next(self) -> list:
        """The next global batch: ``num_microbatches`` ``Batch`` objects on ``device``."""
        batches = []
        for _ in range(self.num_microbatches):
            try:
                idx = next(self._indices)
            except StopIteration:
                if self.cycle and not batches:
                    self.consumed_samples, self._indices = 0, self._sampler(0)
                    idx = next(self._indices)
                else:
                    raise RuntimeError(
                        f"dataset exhausted after {self.consumed_samples} samples "
                        f"({len(self.dataset)} available)"
                    ) from None
            batches.append(self._collate(idx))
        self.consumed_samples += self.global_batch_size
        return batches

    def _collate(self, idx: list[int]):
        from megatron_lite.data.batching import collate_samples, make_batch

        samples = collate_samples([self.dataset[i] for i in idx])
        if self.vocab_size is not None:
            check_token_ids(samples["tokens"], self.vocab_size, self.dataset, idx)
        d = self.data_cfg
        batch = make_batch(
            samples["tokens"],
            self.eod,
            d.reset_position_ids,
            d.reset_attention_mask,
            d.eod_mask_loss,
            sample_loss_mask=samples.get("loss_mask"),
        )
        if "ref_logps" in samples:  # dpo: [2 * pairs] reference log-probs, rows as in tokens
            batch = dataclasses.replace(batch, ref_logps=samples["ref_logps"])
        # after make_batch: packing metadata and positions come from the whole rows
        return to_device(shard_batch(batch, *self.context), self.device)


class BatchDataError(DatasetError):
    """A token id outside the vocabulary, found in this rank's batch (other ranks may not see it)."""

    local = True  # pretrain prints it on the rank that found it


def dataset_name(dataset) -> str:
    """The prefix(es) a dataset reads, for error messages."""
    if hasattr(dataset, "prefix"):
        return str(dataset.prefix)
    if hasattr(dataset, "datasets"):
        return ", ".join(dataset_name(d) for d in dataset.datasets)
    return type(dataset).__name__


def check_token_ids(tokens, vocab_size: int, dataset, indices) -> None:
    """Raise BatchDataError when a token id is negative or >= ``vocab_size``.

    Args:
        tokens: int64 [b, s + 1] token ids of one microbatch (torch or numpy, on the host).
        vocab_size: ``model.vocab_size``.
        dataset: what the tokens came from (named in the message).
        indices: the microbatch's sample indices (named in the message).
    """
    t = torch.as_tensor(tokens)
    top, low = int(t.max()), int(t.min())
    if top < vocab_size and low >= 0:
        return
    bad = top if top >= vocab_size else low
    raise BatchDataError(
        f"{dataset_name(dataset)}: token id {bad} outside the vocabulary [0, {vocab_size}) "
        f"(model.vocab_size) in samples {list(indices)}; was it tokenized with a bigger tokenizer?"
    )


def check_dataset_vocab(prefixes: list[str], vocab_size: int, max_bytes: int = 1 << 30) -> None:
    """Once at start: the largest token id of every ``.bin`` must lie below ``vocab_size``.

    A ``.bin`` of at most ``max_bytes`` is scanned whole (numpy max over the memory map, about a
    second per GiB); larger ones are sampled (64 evenly spaced 1 MiB windows) to keep the start
    cheap, the per-batch check catches what sampling misses.

    Raises:
        DatasetError: ``data error`` naming the dataset and its largest id.
    """
    from megatron_lite.data.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        data = np.frombuffer(ds._bin_buffer, ds.dtype, ds.num_tokens)  # [tokens], no copy
        if data.nbytes > max_bytes:
            step, window = len(data) // 64, (1 << 20) // ds.dtype.itemsize
            data = np.concatenate([data[i * step : i * step + window] for i in range(64)])
        top = int(data.max()) if len(data) else -1
        if top >= vocab_size:
            raise DatasetError(
                f"{prefix}.bin: largest token id {top} >= model.vocab_size ({vocab_size}); the data was "
                "tokenized with a bigger tokenizer than this model's"
            )


def epoch_warnings(dataset, split: str) -> list[str]:
    """One line per component dataset whose documents repeat (the run needs more than one epoch)."""
    parts = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
    lines = []
    for d in parts:
        epochs = getattr(d, "num_epochs", 1)
        if epochs > 1:
            lines.append(
                f" > warning: {split} data {d.prefix} is smaller than the run needs: its documents "
                f"repeat over {epochs} epochs"
            )
    return lines


def to_device(batch, device: torch.device):
    """Copy every tensor field of a dataclass/namedtuple ``Batch`` to ``device`` (non-blocking)."""

    def move(v):
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
        )
    return type(batch)(*(move(v) for v in batch))

"""Data and config drills: out-of-vocabulary token ids, bad blend weights, a corrupt .idx length,
a dataset smaller than the run, resuming with another eval_interval / a longer run, and one
error line per job under torchrun."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from test_reliability_checkpoint import run
from test_training_cli import pretrain

from megatron_lite.config import DataConfig
from megatron_lite.data.builder import build_gpt_datasets
from megatron_lite.data.indexed_dataset import HEADER_SIZE, IndexedDatasetBuilder
from megatron_lite.training.data import BatchDataError, BatchStream

VOCAB = 32000  # the bundled Mistral tokenizer's


@pytest.fixture
def data_args(tmp_path):
    """(make(prefix_name, top_id) -> prefix, command-line args for real data with the Mistral tokenizer)."""
    pytest.importorskip("mistral_common")

    def make(name: str, top: int = 250) -> str:
        with IndexedDatasetBuilder(str(tmp_path / name), dtype=np.uint16) as builder:
            for n in range(20):
                builder.add_document(1 + (np.arange(40 + n) * 7919 + n) % (top - 1))
            builder.add_document(np.full(8, top - 1))  # the largest id is top - 1
        return str(tmp_path / name)

    tok = ["--data.tokenizer_type", "MistralTokenizer", "--data.tokenizer_model", "bundled"]
    args = ["--model.vocab_size", str(VOCAB), "--data.mock", "false", *tok]
    args += ["--data.cache_dir", str(tmp_path / "cache"), "--training.train_iters", "2"]
    return make, args


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path, capsys, data_args):
    make, args = data_args
    bad = make("big", top=40000)  # tokenized with a bigger tokenizer
    rc, _, err = run(tmp_path, capsys, *args, "--data.path", bad)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"data error: {bad}.bin: largest token id 39999 >= model.vocab_size ({VOCAB})")
    # the per-batch host check (what catches ids the start-up sampling of a huge .bin missed)
    train, _, _ = build_gpt_datasets([bad], "1,0,0", 32, (8, 0, 0), 1, cache_dir=str(tmp_path / "cache"))
    stream = BatchStream(
        train, 0, 2, 2, 0, 1, DataConfig(mock=True), 0, torch.device("cpu"), vocab_size=VOCAB
    )
    with pytest.raises(BatchDataError, match=rf"^{bad}: token id \d+ outside the vocabulary \[0, {VOCAB}\)"):
        for _ in range(4):
            stream.next()


def test_bad_blend_weights_and_corrupt_idx_are_data_errors(tmp_path, capsys, data_args):
    make, args = data_args
    good = make("good")
    cases = {
        ("0.5", good, "-1", good): "data error: blend weights [0.5, -1.0] (data.path) must be finite",
        ("0.5", good, "x0.3", good): "data error: data paths ",
        ("0.5", good, "nan", good): "data error: blend weights [0.5, nan]",
    }
    for paths, want in cases.items():
        rc, _, err = run(tmp_path, capsys, *args, "--data.path", *paths)
        assert rc == 1 and err.startswith(want) and err.count("\n") == 1, (paths, err)
    idx = bytearray((tmp_path / "good.idx").read_bytes())
    (n,) = struct.unpack_from("<i", idx, HEADER_SIZE + 4 * 3)
    struct.pack_into("<i", idx, HEADER_SIZE + 4 * 3, n + 1000)  # sequence 3's length
    (tmp_path / "good.idx").write_bytes(bytes(idx))
    rc, _, err = run(tmp_path, capsys, *args, "--data.path", good)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"data error: {good}.idx: corrupt index: sequence 3 has length {n + 1000}")


def test_small_dataset_warns_with_its_epochs(tmp_path, capsys, data_args):
    make, args = data_args
    small = make("small")  # ~1000 tokens: ~31 samples of 33 tokens per epoch
    long_run = ["--training.train_iters", "40", "--training.exit_interval", "1", "--data.split", "1,0,0"]
    rc, out, err = run(tmp_path, capsys, *args, "--data.path", small, *long_run)
    assert rc == 0, err
    assert (
        f" > warning: train data {small} is smaller than the run needs: its documents repeat over 6 epochs"
        in out
    )


def test_resume_with_another_eval_interval_and_a_longer_run(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    first = ["--training.train_iters", "6", "--training.eval_interval", "1", "--training.eval_iters", "2"]
    rc, _, err = run(tmp_path, capsys, *first, "--training.save", ckpt)
    assert rc == 0, err
    longer = ["--training.train_iters", "8", "--training.eval_interval", "4", "--training.eval_iters", "2"]
    rc, out, err = run(tmp_path, capsys, *longer, "--training.load", ckpt, "--training.save", ckpt)
    assert rc == 0, err  # was: ValueError consumed_samples (48) must lie in [0, total_samples=24]
    assert "validation restarts at sample 0 (48 consumed, this run's split has 24)" in out
    assert "training.train_iters changed from 6 (checkpoint) to 8: the LR schedule stretches" in out
    assert "validation loss at iteration 8" in out


@pytest.mark.slow
def test_errors_are_printed_once_under_torchrun(tmp_path, data_args):
    """tp=2 under torchrun: a data error (out-of-vocabulary ids) and a config error, one line each."""
    make, args = data_args
    bad = make("big", top=40000)
    out = pretrain(tmp_path, *args, "--data.path", bad, "--parallel.tensor", "2", nproc=2)
    assert out.returncode != 0 and out.stderr.count("data error:") == 1, out.stderr[-2000:]
    assert "largest token id 39999" in out.stderr
    out = pretrain(tmp_path, "--parallel.tensor", "3", nproc=2)
    assert out.stderr.count("config error:") == 1 and "exitcode  : 2" in out.stderr, out.stderr[-2000:]

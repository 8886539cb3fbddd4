"""Checkpoints: resume reproduces the uninterrupted run (mock and real data), atomic layout, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TINY_MODEL

from megatron_lite.config import load_config
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.pretrain import main as pretrain_main
from megatron_lite.training import checkpoint
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_MODEL,
    "--data.seq_length",
    "32",
    "--training.micro_batch_size",
    "2",
    "--training.global_batch_size",
    "4",
    "--training.train_iters",
    "6",
    "--optimizer.lr_warmup_iters",
    "1",
    "--logging.log_interval",
    "1000",
]


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> list[str]:
    """A SentencePiece model trained on the example corpus and the corpus tokenized into .bin/.idx."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("data")
    jsonl = root / "corpus.jsonl"  # the quickstart's corpus generator: real English, no network
    cmd = [sys.executable, str(REPO / "examples/make_corpus.py"), "--output", str(jsonl), "--max-docs", "300"]
    subprocess.run(cmd, check=True, capture_output=True)
    corpus = jsonl.read_text().splitlines()
    texts = [json.loads(line)["text"] for line in corpus]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(root / "spm"),
        vocab_size=200,
        model_type="bpe",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    with IndexedDatasetBuilder(str(root / "corpus"), dtype=np.uint16) as builder:
        for text in texts:
            builder.add_document(np.array(sp.encode(text) + [sp.eos_id()], dtype=np.int64))
    return [
        "--data.path",
        str(root / "corpus"),
        "--data.tokenizer_type",
        "SentencePieceTokenizer",
        "--data.tokenizer_model",
        str(root / "spm.model"),
        "--data.split",
        "90,10,0",
        "--data.cache_dir",
        str(root / "cache"),
        "--data.eod_mask_loss",
        "true",
        "--data.reset_position_ids",
        "true",
    ]


def run(*overrides: str) -> list[float]:
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, 1)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    return [r.loss for r in trainer.train()]


@pytest.mark.parametrize("data", ["mock", "real"])
def test_resume_reproduces_losses(tmp_path, data, request):
    source = ["--data.mock", "true"] if data == "mock" else request.getfixturevalue("real_data")
    evals = ["--training.eval_interval", "2", "--training.eval_iters", "1"]
    full = run(*source, *evals)
    ckpt = str(tmp_path / "ckpt")
    first = run(*source, *evals, "--training.save", ckpt, "--training.exit_interval", "3")
    assert checkpoint.latest_iteration(ckpt) == 3
    second = run(*source, *evals, "--training.load", ckpt, "--training.save", ckpt)
    assert len(full) == 6 and first + second == full  # bitwise: same samples, states and RNG
    assert checkpoint.latest_iteration(ckpt) == 6


def test_layout_is_atomic(tmp_path):
    ckpt = tmp_path / "ckpt"
    stale = ckpt / "iter_0000002.tmp"  # what a crash in the middle of a save leaves behind
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    run(
        "--data.mock",
        "true",
        "--training.save",
        str(ckpt),
        "--training.save_interval",
        "2",
        "--training.train_iters",
        "4",
    )
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000004", checkpoint.TRACKER]
    assert (ckpt / checkpoint.TRACKER).read_text() == "4\n"
    it = ckpt / "iter_0000004"
    assert sorted(p.name for p in it.iterdir()) == ["config.yaml", "metadata.json", "mp_rank_00", "rng"]
    state = torch.load(it / "mp_rank_00" / checkpoint.MODEL_FILE, weights_only=True)
    assert state["iteration"] == 4 and state["consumed_samples"] == 16
    assert "layers.0.attention.wqkv.weight" in state["model"] and "optimizer" in state
    assert load_config(it / "config.yaml").training.train_iters == 4


def test_keep_last_checkpoints_prunes_old_iterations(tmp_path):
    ckpt = tmp_path / "ckpt"
    keep = ["--training.save_interval", "1", "--training.keep_last_checkpoints", "2"]
    full = run("--data.mock", "true")
    first = run("--data.mock", "true", "--training.save", str(ckpt), *keep, "--training.exit_interval", "4")
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    rest = run("--data.mock", "true", "--training.load", str(ckpt), "--training.save", str(ckpt), *keep)
    assert first + rest == full
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000005", "iter_0000006"]
    assert checkpoint.prune(ckpt, 0) == [ckpt / "iter_0000005"]  # the tracker's iteration stays


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    run("--data.mock", "true", "--training.save", str(ckpt), "--training.train_iters", "2")
    model_file = ckpt / "iter_0000002" / "mp_rank_00" / checkpoint.MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])
    run_dir = ["--logging.run_dir", str(tmp_path / "r")]
    args = [*TINY, "--data.mock", "true", "--training.load", str(ckpt), *run_dir]
    assert pretrain_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("checkpoint error: ") and str(model_file) in err
    (ckpt / checkpoint.TRACKER).write_text("7\n")
    assert pretrain_main(args) == 1
    err = capsys.readouterr().err
    assert "iter_0000007" in err and "missing" in err
    (ckpt / checkpoint.TRACKER).write_text("seven")
    assert pretrain_main(args) == 1
    assert "is corrupt" in capsys.readouterr().err
    empty = [*TINY, "--data.mock", "true", "--training.load", str(tmp_path / "nothing"), *run_dir]
    assert pretrain_main(empty) == 1
    assert checkpoint.TRACKER in capsys.readouterr().err


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    ckpt = tmp_path / "ckpt"
    run("--data.mock", "true", "--training.save", str(ckpt), "--training.train_iters", "2")
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        run("--data.mock", "true", "--training.load", str(ckpt), "--model.num_layers", "3")


def test_shard_names_and_writers():
    dims = ParallelDims.build(8, tp=2, ep=2)  # dp = 4, edp = 2
    names = {r: checkpoint.shard_name(dims, r) for r in range(8)}
    writers = [r for r in range(8) if checkpoint.is_shard_writer(dims, r)]
    assert writers == [0, 1, 2, 3]
    assert [names[r] for r in writers] == [
        "mp_rank_00_000",
        "mp_rank_01_000",
        "mp_rank_00_001",
        "mp_rank_01_001",
    ]
    assert names[4] == names[0]  # an expert-data-parallel replica reads rank 0's file
    single = ParallelDims.build(1)
    assert checkpoint.shard_name(single, 0) == "mp_rank_00" and checkpoint.is_shard_writer(single, 0)


def test_rng_state_roundtrip():
    state = checkpoint.rng_state()
    a = (torch.rand(2), np.random.rand(), __import__("random").random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]

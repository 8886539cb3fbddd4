"""``python -m megatron_lite.pretrain`` end to end in subprocesses (CPU), and under torchrun with TP."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dist_utils import free_port
from test_training_logging import TRAIN_RE, VALID_RE

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
    },
    "data": {"mock": True, "seq_length": 32},
    "training": {
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "train_iters": 4,
        "eval_interval": 2,
        "eval_iters": 1,
    },
    "optimizer": {"lr": 1e-3, "lr_warmup_iters": 1},
    "logging": {"log_interval": 2},
}


def pretrain(tmp_path: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    launcher = [sys.executable, "-m", "megatron_lite.pretrain"]
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            "-m",
            "megatron_lite.pretrain",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [*launcher, "--config", str(config), "--logging.run_dir", str(tmp_path / "run"), *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_logs_and_saves(tmp_path):
    out = pretrain(tmp_path, "--training.save", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    lines = [m for m in map(TRAIN_RE.search, out.stdout.splitlines()) if m]
    assert [int(m["it"]) for m in lines] == [2, 4] and all(int(m["total"]) == 4 for m in lines)
    assert [int(m["samples"]) for m in lines] == [8, 16] and lines[0]["mfu"] == "n/a"
    assert all(0 < float(m["loss"]) < 10 for m in lines)
    assert len([m for m in map(VALID_RE.search, out.stdout.splitlines()) if m]) == 2
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4\n"


def test_cli_config_error(tmp_path):
    out = pretrain(tmp_path, "--training.global_batch_size", "3")
    assert out.returncode == 2
    assert out.stderr.startswith("config error: training.global_batch_size (3)")
    assert out.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_cli_data_errors_are_one_line(tmp_path):
    """A missing or truncated dataset stops the run with one line naming the file."""
    import numpy as np

    pytest.importorskip("mistral_common")
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(tmp_path / "d"), dtype=np.uint16) as builder:
        for n in range(20):
            builder.add_document(np.arange(1, 40 + n) % 250)
    tokenizer = ["--data.tokenizer_type", "MistralTokenizer", "--data.tokenizer_model", "bundled"]
    data = ["--model.vocab_size", "32000", "--data.mock", "false", *tokenizer, "--data.path"]
    missing = pretrain(tmp_path, *data, str(tmp_path / "nope"))
    idx = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx[:60])
    truncated = pretrain(tmp_path, *data, str(tmp_path / "d"))
    for out, what in ((missing, "nope.idx"), (truncated, "d.idx: truncated index")):
        assert out.returncode == 1, out.stderr
        assert out.stderr.startswith("data error: ") and what in out.stderr and "Traceback" not in out.stderr


def test_sigterm_saves_and_resume_continues(tmp_path):
    """SIGTERM (SLURM preemption) mid-run: the iteration finishes, a checkpoint is saved, exit 3
    (requeue) with the run dir's requeue marker; the relaunch resumes after it."""
    import signal

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "logging": {"log_interval": 1}}))
    ckpt = str(tmp_path / "ckpt")
    argv = [sys.executable, "-m", "megatron_lite.pretrain", "--config", str(config), "--training.train_iters"]
    argv += ["100000", "--training.save", ckpt, "--training.load", ckpt, "--logging.run_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    err_file = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
    for line in proc.stdout:  # wait until training runs, then ask it to stop
        if TRAIN_RE.search(line):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    err_file.close()
    assert proc.returncode == 3, (tmp_path / "stderr.txt").read_text()
    assert "on a signal" in out and (tmp_path / "requeue").is_file()
    stopped = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped < 100000
    again = pretrain(tmp_path, "--training.load", ckpt, "--training.train_iters", str(stopped + 2))
    assert again.returncode == 0, again.stderr
    assert f"resumed from {ckpt} at iteration {stopped}" in again.stdout


def test_cli_peak_override_reports_mfu(tmp_path):
    out = pretrain(
        tmp_path,
        "--logging.peak_tflops",
        "0.001",
        "--training.train_iters",
        "2",
        "--training.eval_interval",
        "none",
    )
    assert out.returncode == 0, out.stderr
    (m,) = [m for m in map(TRAIN_RE.search, out.stdout.splitlines()) if m]
    assert m["mfu"].endswith("%") and float(m["mfu"][:-1]) > 0


@pytest.mark.slow
def test_torchrun_tensor_parallel(tmp_path):
    out = pretrain(tmp_path, "--parallel.tensor", "2", "--training.save", str(tmp_path / "ckpt"), nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [m for m in map(TRAIN_RE.search, out.stdout.splitlines()) if m]
    assert [int(m["it"]) for m in lines] == [2, 4]  # printed by the last rank only
    shards = sorted(p.name for p in (tmp_path / "ckpt" / "iter_0000004").iterdir())
    assert shards == ["config.yaml", "metadata.json", "mp_rank_00", "mp_rank_01", "rng"]


def test_bench_train_tiny_smoke(tmp_path):
    """The GPU benchmark script runs end to end on its tiny CPU config (both models)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--warmup", "0", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["megatron_lite", "hf_mistral_sdpa"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["loss"] < 10 for r in rows)

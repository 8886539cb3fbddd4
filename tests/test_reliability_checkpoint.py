"""Reliability drills on real checkpoint files: digests, missing RNG, non-finite weights, the save
directory's lock, stale .tmp, room and a write that fails for real (file-size limit = disk full)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_training_cli import CONFIG, REPO
from tiny import TINY_MODEL

from megatron_lite.pretrain import main as pretrain_main
from megatron_lite.training import checkpoint, save_dir

BASE = [
    *TINY_MODEL,
    "--data.mock",
    "true",
    "--data.seq_length",
    "32",
    "--training.micro_batch_size",
    "2",
    "--training.global_batch_size",
    "4",
    "--optimizer.lr_warmup_iters",
    "1",
    "--logging.log_interval",
    "1",
]


def run(tmp_path: Path, capsys, *args: str) -> tuple[int, str, str]:
    """``pretrain.main`` in this process (no interpreter start-up): (status, stdout, stderr)."""
    capsys.readouterr()
    rc = pretrain_main([*BASE, "--logging.run_dir", str(tmp_path / "run"), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def saved(tmp_path, capsys) -> Path:
    """A run of 2 iterations saved at 2 into ``tmp_path/ckpt``."""
    ckpt = tmp_path / "ckpt"
    rc, _, err = run(tmp_path, capsys, "--training.train_iters", "2", "--training.save", str(ckpt))
    assert rc == 0, err
    return ckpt


def resume(tmp_path, capsys, ckpt: Path) -> tuple[int, str, str]:
    return run(tmp_path, capsys, "--training.train_iters", "3", "--training.load", str(ckpt))


def test_flipped_byte_is_refused_with_the_file_name(tmp_path, capsys, saved):
    model_file = saved / "iter_0000002" / "mp_rank_00" / checkpoint.MODEL_FILE
    meta = json.loads((saved / "iter_0000002" / "metadata.json").read_text())
    assert meta["world_size"] == 1 and "mp_rank_00/model_optim_rng.pt" in meta["sha256"]
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside tensor data: torch.load alone would accept it
    model_file.write_bytes(bytes(data))
    rc, _, err = resume(tmp_path, capsys, saved)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"checkpoint error: checkpoint file {model_file} is corrupt: its sha256 differs")


def test_missing_rng_file_is_an_error(tmp_path, capsys, saved):
    rng = saved / "iter_0000002" / "rng" / "rank_00000.pt"
    rng.unlink()
    rc, _, err = resume(tmp_path, capsys, saved)
    assert rc == 1 and err == f"checkpoint error: checkpoint file {rng} is missing (RNG state of rank 0)\n"


def test_nonfinite_weight_in_a_checkpoint_is_refused_by_name(tmp_path, capsys, saved):
    """An inf written into a weight (and a matching digest, as a buggy writer would leave it)."""
    it = saved / "iter_0000002"
    model_file = it / "mp_rank_00" / checkpoint.MODEL_FILE
    state = torch.load(model_file, weights_only=True)
    name = sorted(state["model"])[0]
    state["model"][name].view(-1)[3] = float("inf")
    torch.save(state, model_file)
    meta = json.loads((it / "metadata.json").read_text())
    meta["sha256"]["mp_rank_00/model_optim_rng.pt"] = checkpoint.file_digest(model_file)
    (it / "metadata.json").write_text(json.dumps(meta))
    rc, _, err = resume(tmp_path, capsys, saved)
    assert (
        rc == 1
        and err == f"checkpoint error: checkpoint file {model_file} holds a non-finite tensor: model.{name}\n"
    )


@pytest.mark.slow
def test_second_run_on_a_locked_directory_is_refused(tmp_path, capsys):
    """A live run owns the directory: a second run stops with one line naming host, pid and job."""
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "first.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "logging": {"log_interval": 1}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "megatron_lite.pretrain", "--config", str(config), "--training.train_iters"]
    argv += ["100000", "--training.save", str(ckpt), "--logging.run_dir", str(tmp_path / "first")]
    first = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in first.stdout:  # the lock is taken before the first iteration
            if "iteration" in line:
                break
        rc, _, err = run(tmp_path, capsys, "--training.train_iters", "2", "--training.save", str(ckpt))
    finally:
        first.kill()
        first.wait()
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(
        f"checkpoint error: save directory {ckpt} is in use by host {socket.gethostname()} "
    )
    assert f"pid {first.pid} " in err
    # the first run is dead now: its lock is stale and taken over with a warning
    rc, out, err = run(tmp_path, capsys, "--training.train_iters", "2", "--training.save", str(ckpt))
    assert rc == 0, err
    assert f"taking over {ckpt / '.lock'} from a dead process" in out and not (ckpt / ".lock").exists()


def test_stale_tmp_removed_and_unusable_directories_refused(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000007.tmp" / "rng").mkdir(parents=True)  # a crash during an earlier save
    rc, out, err = run(tmp_path, capsys, "--training.train_iters", "2", "--training.save", str(ckpt))
    assert rc == 0, err
    assert f"removing {ckpt / 'iter_0000007.tmp'}" in out and not (ckpt / "iter_0000007.tmp").exists()
    (tmp_path / "afile").write_text("x")
    rc, _, err = run(tmp_path, capsys, "--training.save", str(tmp_path / "afile" / "ckpt"))
    assert rc == 1 and err.startswith(
        f"checkpoint error: save directory {tmp_path / 'afile' / 'ckpt'} is not writable"
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"GiB free, one checkpoint needs about .* GiB"):
        save_dir.prepare(tmp_path / "big", 10**15, print, True)
    assert not (tmp_path / "big" / ".lock").exists()


def _limit_file_size() -> None:  # runs in the child: files beyond 256 KiB fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_failed_save_is_a_checkpoint_error_and_leaves_no_tmp(tmp_path):
    """A write that really fails (RLIMIT_FSIZE: the kernel refuses it like a full disk)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "megatron_lite.pretrain", "--config", str(config), "--training.train_iters"]
    argv += ["2", "--training.save", str(ckpt), "--logging.run_dir", str(tmp_path / "run")]
    out = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(
        f"checkpoint error: saving iteration 2 to {ckpt} failed on rank 0: File too large"
    )
    assert out.stderr.count("\n") == 1
    assert sorted(p.name for p in ckpt.iterdir()) == []  # no iter_*.tmp, no tracker, lock released


def test_lock_of_an_earlier_allocation_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job lands on other nodes: its old lock (other host, same job id) is stale; a lock
    of another host and another job is not."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock_path = tmp_path / save_dir.LOCK_FILE
    lock_path.write_text(json.dumps({"host": "node-gone", "pid": 1, "job_id": "4242"}))
    said: list[str] = []
    lock = save_dir.SaveDirLock(tmp_path)
    lock.acquire(said.append)
    assert (
        "from an earlier run of this job" in said[0] and json.loads(lock_path.read_text())["job_id"] == "4242"
    )
    lock.release()
    lock_path.write_text(json.dumps({"host": "node-other", "pid": 1, "job_id": "7"}))
    with pytest.raises(checkpoint.CheckpointError, match=r"is in use by host node-other pid 1 job 7"):
        save_dir.SaveDirLock(tmp_path).acquire(said.append)

"""Multi-process drills with real signals: a frozen rank times out, torchrun restarts a killed rank
from the last checkpoint with the uninterrupted run's losses, and a preempted job saves even when
the save takes longer than torchrun's default 30 s grace period. All through the shipped launch
script (examples/launch/torchrun_multinode.sh) where torchrun is involved."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dist_utils import free_port
from test_training_cli import CONFIG, REPO
from test_training_logging import TRAIN_RE

from megatron_lite.pretrain import main as pretrain_main
from megatron_lite.training import checkpoint

LAUNCH = REPO / "examples" / "launch" / "torchrun_multinode.sh"
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "logging": {"log_interval": 1}}))
    return config


def _launch(cmd: list[str], env: dict[str, str], err) -> subprocess.Popen:
    """torchrun in its own session, so a hung job is killed whole (``_finish``)."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def _losses(text: str) -> dict[int, str]:
    return {int(m["it"]): m["loss"] for m in map(TRAIN_RE.search, text.splitlines()) if m}


def test_frozen_rank_times_out_with_one_line(tmp_path):
    """SIGSTOP on rank 1: rank 0 leaves its collective after training.dist_timeout_minutes (6 s)."""
    port, config = str(free_port()), _config(tmp_path)
    argv = [sys.executable, "-m", "megatron_lite.pretrain", "--config", str(config), "--training.train_iters"]
    argv += ["100000", "--training.dist_timeout_minutes", "0.1", "--logging.run_dir", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        err = (tmp_path / f"err{rank}.txt").open("w")
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
    try:
        for line in procs[1].stdout:  # rank 1 logs; once it trains, freeze it
            if TRAIN_RE.search(line):
                break
        procs[1].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        procs[0].communicate(timeout=120)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = (tmp_path / "err0.txt").read_text()
    assert procs[0].returncode == 1 and waited < 60, (waited, err[-2000:])
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and lines[0].startswith("distributed error: Timed out waiting 6000ms"), err[-2000:]
    assert "a rank froze or died (training.dist_timeout_minutes is 0.1)" in lines[0]


def test_torchrun_restart_resumes_with_the_uninterrupted_losses(tmp_path, capsys):
    """MAX_RESTARTS=1: SIGKILL one worker after the checkpoint of iteration 4; the restarted job
    resumes there and prints the losses of an uninterrupted run."""
    ckpt = str(tmp_path / "ckpt")
    args = ["--training.train_iters", "8", "--training.save", ckpt, "--training.load", ckpt]
    args += ["--training.save_interval", "2", "--logging.run_dir", str(tmp_path / "run")]
    env = _env(GPUS_PER_NODE="2", MAX_RESTARTS="1", MASTER_PORT=str(free_port()))
    err = (tmp_path / "stderr.txt").open("w")
    cmd = ["bash", str(LAUNCH), str(_config(tmp_path)), *args]
    proc = _launch(cmd, env, err)
    first = []
    for line in proc.stdout:
        first.append(line)
        if "saved checkpoint at iteration       4" in line:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
            os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)
            break
    out = _finish(proc, 240)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert f"resumed from {ckpt} at iteration 4" in out
    resumed = _losses(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    # the uninterrupted run (one process, same global batch: the losses agree to print precision)
    capsys.readouterr()
    ref_args = ["--config", str(tmp_path / "config.yaml"), "--training.train_iters", "8"]
    ref_args += ["--logging.run_dir", str(tmp_path / "ref")]
    assert pretrain_main(ref_args) == 0
    reference = _losses(capsys.readouterr().out)
    before = _losses("".join(first))
    for it, loss in {**before, **resumed}.items():
        assert float(loss) == pytest.approx(float(reference[it]), rel=2e-6), it


def test_preemption_saves_even_when_the_save_outlasts_30s(tmp_path):
    """SIGTERM to torchrun (as SLURM sends it): the worker finishes its iteration and saves, with a
    save slowed to 35 s (torchrun's default would SIGKILL it at 30 s); exit 3 + requeue marker."""
    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"
    args = [
        "--training.train_iters",
        "100000",
        "--training.save",
        str(ckpt),
        "--logging.run_dir",
        str(run_dir),
    ]
    env = _env(GPUS_PER_NODE="1", SHUTDOWN_TIMEOUT="120", MASTER_PORT=str(free_port()))
    env[checkpoint.SAVE_DELAY_ENV] = "35"
    err = (tmp_path / "stderr.txt").open("w")
    cmd = ["bash", str(LAUNCH), str(_config(tmp_path)), *args]
    proc = _launch(cmd, env, err)
    for line in proc.stdout:
        if TRAIN_RE.search(line):
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            break
    out = _finish(proc, 200)
    took = time.monotonic() - start
    stderr = (tmp_path / "stderr.txt").read_text()
    m = re.search(r"exiting after iteration (\d+) on a signal", out)
    assert m and took > 35, (took, stderr[-3000:])
    assert (
        checkpoint.latest_iteration(ckpt) == int(m[1])
        and f"saved checkpoint at iteration {int(m[1]):7d}" in out
    )
    assert (run_dir / "requeue").read_text() == f"{m[1]}\n"
    assert "exitcode  : -9" not in stderr and "SIGKILL" not in stderr

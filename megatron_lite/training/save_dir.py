"""The save directory is checked and owned before training: writable, room for a checkpoint, locked.

At start, rank 0 of a run that saves:

- removes ``iter_*.tmp`` left by a crash during a save (never complete: ``latest`` never pointed
  at them);
- checks that it can create files there and that the file system has room for one more checkpoint
  (estimated from the parameter count: fp32 weights and two Adam moments, 12 bytes/parameter);
- takes ``<save>/.lock`` holding the host, pid and SLURM job id, so a second run started on the
  same directory stops with one line instead of interleaving its checkpoints with ours. A lock left
  by a dead process of this host, or by an earlier allocation of the same SLURM job (a requeue
  lands on other nodes), is taken over with a warning; any other lock is an error naming its owner.

Every rank learns rank 0's verdict (``gather``), so all raise the same ``CheckpointError`` and none
waits alone in a collective.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_lite.training.checkpoint_files import CheckpointError

LOCK_FILE = ".lock"
BYTES_PER_PARAM = 12  # fp32 weights + Adam exp_avg + exp_avg_sq, as checkpoint files hold them


def checkpoint_bytes(num_params: int) -> int:
    """Estimated size of one checkpoint of a model with ``num_params`` parameters."""
    return BYTES_PER_PARAM * num_params


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SaveDirLock:
    """``<root>/.lock`` owned by this process until :meth:`release`."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self.held = False

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Create the lock, take over a stale one (with a warning), or raise CheckpointError."""
        me = _owner()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me, warn)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise CheckpointError(f"could not take the lock {self.path}")

    def _take_over_if_stale(self, me: dict[str, Any], warn: Callable[[str], None]) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        same_host = owner.get("host") == me["host"]
        if same_host and owner.get("pid") == me["pid"]:  # ours (an earlier run in this process)
            self.path.unlink(missing_ok=True)
            return
        dead = same_host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"])
        requeued = me["job_id"] is not None and owner.get("job_id") == me["job_id"]
        if owner and not (dead or requeued):
            raise CheckpointError(
                f"save directory {self.path.parent} is in use by host {owner.get('host')} pid "
                f"{owner.get('pid')} job {owner.get('job_id')} (lock {self.path}); use another "
                "training.save, or delete the lock if that run is dead"
            )
        why = "a dead process" if dead else "an earlier run of this job" if requeued else "an unreadable lock"
        warn(f" > warning: taking over {self.path} from {why}: {owner or 'no owner recorded'}")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def prepare(
    root: str | Path, num_params: int, say: Callable[[str], None], is_rank0: bool, gather=lambda x: [x]
) -> SaveDirLock | None:
    """Check, clean and lock the save directory (rank 0), agreeing on the outcome on every rank.

    Args:
        root: ``training.save``.
        num_params: the whole model's parameter count (for the size estimate).
        say: where warnings go.
        is_rank0: whether this process does the work.
        gather: all-gathers one picklable object per rank (``Runtime.gather_objects``).

    Returns:
        The held lock on rank 0 (release it when the run ends), None elsewhere.

    Raises:
        CheckpointError: on every rank, with rank 0's one-line reason.
    """
    error, lock = None, None
    if is_rank0:
        try:
            lock = _prepare_rank0(Path(root), num_params, say)
        except CheckpointError as exc:
            error = str(exc)
    reason = gather(error)[0]
    if reason is not None:
        raise CheckpointError(reason)
    return lock


def _prepare_rank0(root: Path, num_params: int, say: Callable[[str], None]) -> SaveDirLock:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"save directory {root} is not writable: {exc.strerror or exc}") from None
    lock = SaveDirLock(root)
    lock.acquire(say)
    for stale in sorted(root.glob("iter_*.tmp")):
        say(f" > removing {stale}: an incomplete checkpoint left by a crash during a save")
        shutil.rmtree(stale, ignore_errors=True)
    need, free = checkpoint_bytes(num_params), shutil.disk_usage(root).free
    if free < need:
        lock.release()
        raise CheckpointError(
            f"save directory {root} has {free / 2**30:.2f} GiB free, one checkpoint needs about "
            f"{need / 2**30:.2f} GiB ({num_params:,} parameters x {BYTES_PER_PARAM} bytes)"
        )
    return lock

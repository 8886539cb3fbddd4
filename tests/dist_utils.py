"""Run a test body on N real processes with the gloo backend (CPU).

Usage::

    def _body(rank, world_size, arg):
        ...  # torch.distributed is initialised; raise AssertionError on failure

    def test_x():
        run_distributed(_body, 4, arg)

The body must be a module-level function (it is pickled for spawn). Failures in
any rank are re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from multiprocessing import connection as mp_connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_FAILURE_GRACE_S = 10.0  # time the other ranks get to report their own error after one fails


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - forward every failure to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> None:
    """Spawn ``world_size`` gloo processes running ``fn(rank, world_size, *args)``.

    ``timeout`` bounds the whole run. As soon as one rank fails (reports an error or exits
    non-zero) the others get a short grace to report, then are killed: they would otherwise wait
    in a collective that can never complete, and the suite would stall for the full timeout.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        live = [p for p in procs if p.exitcode is None]
        if not live:
            break
        now = time.monotonic()
        if failed_at is None and (not errors.empty() or any(p.exitcode not in (None, 0) for p in procs)):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + _FAILURE_GRACE_S):
            break
        mp_connection.wait([p.sentinel for p in live], timeout=0.2)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    if not errors.empty():
        rank, tb = errors.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if alive and failed_at is None:
        raise AssertionError(f"{len(alive)} rank(s) hung past {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with codes {bad}")

"""Checkpoints that survive crashes: written to a temporary directory, renamed into place, tracker last.

Layout (names follow Megatron's so tools recognise them)::

    <dir>/latest_checkpointed_iteration.txt      "N", replaced atomically after the rename
    <dir>/iter_000000N/config.yaml               the run's resolved config (for humans)
    <dir>/iter_000000N/mp_rank_XX[_PPP][_EEE]/model_optim_rng.pt
    <dir>/iter_000000N/mp_rank_XX[_PPP][_EEE]/distrib_optim_dpDDD.pt   (distributed optimizer only)
    <dir>/iter_000000N/rng/rank_RRRRR.pt         every rank's RNG states

``model_optim_rng.pt`` holds the local model's state dict under canonical parameter names (with
tensor/expert parallelism: this rank's shards; resharding is a separate tool), the optimizer,
scheduler and loss-scaler states, the iteration and the consumed sample counts (and, with
``training.ema_decay``, the fp32 EMA of the weights under ``"ema"``, ``training/ema.py``). Exactly one rank
writes each distinct shard set: the lowest rank with the same (tp, etp, ep, pp) coordinates, as
data-parallel replicas hold identical states. With the distributed optimizer they do not: the
shard writer's file holds only the optimizer's layout, and every rank writes its own AdamW shard as
``distrib_optim_dp{dp rank:03d}.pt`` in its shard directory (``DistributedOptimizer``).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint_files import (  # noqa: F401 - CheckpointError, read_state: public here
    METADATA_FILE,
    CheckpointError,
    _atomic_write_text,
    _fsync_dir,
    atomic_save,
    file_digest,
    first_error,
    first_nonfinite,
    os_reason,
    read_metadata,
    read_state,
    write_metadata,
)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim_dp{:03d}.pt"
SAVE_DELAY_ENV = "MEGATRON_LITE_TEST_SAVE_DELAY"  # test hook: seconds each save sleeps (slow-disk drill)


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``<root>/iter_{iteration:07d}``."""
    return Path(root) / f"iter_{iteration:07d}"


def _shard_key(dims: ParallelDims, rank: int) -> tuple[int, int, int, int]:
    c = dims.coords(rank)
    return (c.tp, c.etp, c.ep, c.pp)


def shard_name(dims: ParallelDims, rank: int) -> str:
    """Megatron-style ``mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]`` (+ ``_etp{etp}`` when etp != tp)."""
    c = dims.coords(rank)
    name = f"mp_rank_{c.tp:02d}"
    if dims.pp > 1:
        name += f"_{c.pp:03d}"
    if dims.ep > 1:
        name += f"_{c.ep:03d}"
    if dims.etp != dims.tp:
        name += f"_etp{c.etp:02d}"
    return name


def is_shard_writer(dims: ParallelDims, rank: int) -> bool:
    """Whether ``rank`` is the lowest rank holding its shard set."""
    key = _shard_key(dims, rank)
    return all(_shard_key(dims, r) != key for r in range(rank))


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's own device only: a relaunch may see fewer GPUs, or map the rank to another index.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_state = cuda_rng_state_for_device(state["cuda"], torch.cuda.current_device())
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


def cuda_rng_state_for_device(saved: Any, device_index: int) -> torch.Tensor | None:
    """The CUDA generator state to restore on ``device_index``.

    Checkpoints hold this device's state (one tensor); older ones held every visible GPU's state
    as a list indexed by device, of which this device's entry is taken (None when the list is
    shorter than the index: the fresh seed stays).
    """
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and device_index < len(saved):
        return saved[device_index]
    return None


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_one(obj: Any) -> list[Any]:
    return [obj]


def save(
    root: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    consumed_samples: int,
    config_yaml: str,
    dims: ParallelDims,
    barrier=lambda: None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    gather: Callable[[Any], list[Any]] = _gather_one,
    ema=None,
) -> Path:
    """Write checkpoint ``iteration`` under ``root``; every rank calls this.

    Args:
        root: checkpoint directory (``training.save``).
        iteration: completed iterations.
        model, optimizer, scheduler: local states to save (``scheduler.state_dict()``).
        consumed_samples: training samples consumed so far (the data position to resume from).
        config_yaml: the resolved config, stored for reference.
        dims: rank grid (decides the shard file name and which ranks write).
        barrier: synchronises all ranks (a no-op on one process).
        extra: more picklable-by-weights-only state (loss scaler, consumed validation samples, ...).
        keep_last: once this checkpoint is complete, delete all but the newest ``keep_last``
            ``iter_*`` directories (None keeps everything).
        gather: all-gathers one picklable object per rank into a rank-ordered list (identity list
            on one process); every rank learns of a failure anywhere, so none waits alone.
        ema: the run's ``training.ema.WeightEMA`` or None; its full local state is stored under
            ``"ema"`` next to ``"model"`` (all ranks call this: ZeRO-1 pieces are gathered).

    Returns:
        The final ``iter_N`` directory.

    Raises:
        CheckpointError: on every rank, when any rank holds a non-finite model tensor (nothing is
            written) or failed to write (the ``.tmp`` directory is removed).
    """
    root, rank = Path(root), dims.rank or 0
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    # Mixed precision: the optimizer's fp32 main values under the model's names (all ranks take
    # part: the distributed optimizer gathers its shards); fp32 weights: the model's own.
    main_state = getattr(optimizer, "model_state_dict", None)
    model_state = main_state(model) if main_state is not None else model.state_dict()
    ema_state = ema.state_dict(model) if ema is not None else None
    bad = first_error(gather(first_nonfinite(model_state)))
    if bad is not None:
        raise CheckpointError(
            f"not saving iteration {iteration} to {root}: model tensor {bad[1]} (rank {bad[0]}) is not finite"
        )
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash during an earlier save
            (tmp / "rng").mkdir(parents=True)
            (tmp / "config.yaml").write_text(config_yaml)
        except OSError as exc:
            error = os_reason(exc, tmp)
    results = [(e, {}) for e in gather(error)]  # also the barrier: the directory exists
    if first_error([e for e, _ in results]) is None:
        digests = {}
        try:
            digests = _write_rank_files(
                tmp,
                rank,
                dims,
                iteration,
                model_state,
                optimizer,
                scheduler,
                consumed_samples,
                config_yaml,
                extra,
                ema_state,
            )
        except (OSError, RuntimeError) as exc:  # torch.save wraps a failed write in RuntimeError
            error = os_reason(exc, tmp)
        results = gather((error, digests))
    failed = first_error([e for e, _ in results])
    if failed is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointError(
            f"saving iteration {iteration} to {root} failed on rank {failed[0]}: {failed[1]}"
        )
    if rank == 0:
        write_metadata(tmp, iteration, dims.world_size, [d for _, d in results])
        publish(tmp, final, root, iteration)
        if keep_last is not None:
            prune(root, keep_last)
    barrier()
    return final


def _write_rank_files(
    tmp,
    rank,
    dims,
    iteration,
    model_state,
    optimizer,
    scheduler,
    consumed_samples,
    config_yaml,
    extra,
    ema_state=None,
) -> dict[str, str]:
    """This rank's files of checkpoint ``tmp``; returns ``{path relative to tmp: sha256}``."""
    digests = {}
    if is_shard_writer(dims, rank):
        (tmp / shard_name(dims, rank)).mkdir(exist_ok=True)
        state = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": config_yaml,
            "extra": extra or {},
        }
        if ema_state is not None:
            state["ema"] = ema_state
        name = f"{shard_name(dims, rank)}/{MODEL_FILE}"
        digests[name] = atomic_save(state, tmp / name)
    if hasattr(optimizer, "sharded_state_dict"):  # distributed optimizer: every dp rank's own shard
        (tmp / shard_name(dims, rank)).mkdir(exist_ok=True)
        path = distrib_optim_path(tmp, dims, rank)
        digests[str(path.relative_to(tmp))] = atomic_save(optimizer.sharded_state_dict(), path)
    digests[f"rng/rank_{rank:05d}.pt"] = atomic_save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if delay > 0:  # drills: a save as slow as a big model's on a busy file system
        import time

        time.sleep(delay)
    return digests


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete ``iter_*`` directories; returns the deleted.

    Runs after the tracker points at the newest one, so a crash here never leaves the run without
    a complete checkpoint; the tracker's iteration is never deleted.
    """
    latest = latest_iteration(root)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    doomed = [p for p in done[: max(len(done) - keep_last, 0)] if int(p.name[5:]) != latest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def distrib_optim_path(iter_dir: Path, dims: ParallelDims, rank: int) -> Path:
    """``<iter_dir>/<shard name>/distrib_optim_dp{i:03d}.pt``: one rank's distributed-optimizer shard.

    ``i`` is the rank's index in the dp x cp group over which the optimizer shards (its dp index
    without context parallelism).
    """
    return iter_dir / shard_name(dims, rank) / DISTRIB_OPTIM_FILE.format(dims.coords(rank).dp_cp)


def publish(tmp: Path, final: Path, root: Path, iteration: int) -> None:
    """Rename the finished ``tmp`` directory to ``final``, then point the tracker at it (last)."""
    if final.exists():  # re-saving an iteration: keep the old one until the new one is in place
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _atomic_write_text(root / TRACKER, f"{iteration}\n")  # last: the checkpoint is complete


def model_only_state(model_state: dict[str, torch.Tensor], config_yaml: str) -> dict[str, Any]:
    """A shard file's contents for a weights-only checkpoint (converted, not trained: iteration 0).

    Loading it starts a fresh run from these weights: new optimizer and LR schedule, no data
    position, like Megatron's release checkpoints.
    """
    return {
        "iteration": 0,
        "consumed_samples": 0,
        "model": model_state,
        "optimizer": None,
        "scheduler": None,
        "config": config_yaml,
        "extra": {"model_only": True},
    }


def latest_iteration(root: str | Path) -> int | None:
    """Iteration named by the tracker file, None when there is no tracker; CheckpointError if unreadable."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"checkpoint tracker {tracker} is corrupt: {text[:40]!r} is not an iteration"
        ) from None


def load(
    root: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler,
    dims: ParallelDims,
    iteration: int | None = None,
) -> dict[str, Any] | None:
    """Restore the latest (or the given) checkpoint into the local objects; every rank calls this.

    Returns:
        ``{"iteration", "consumed_samples", "extra", "ema", "path"}`` (``"ema"``: the stored EMA
        state dict or None; ``"path"``: the model file read), or None when ``root`` has no tracker file
        and no iteration was asked for (nothing to resume).

    Raises:
        CheckpointError: a named file is missing, corrupt, or does not match the model.
    """
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
    rank = dims.rank or 0
    meta = read_metadata(iteration_dir(root, iteration))
    path = iteration_dir(root, iteration) / shard_name(dims, rank) / MODEL_FILE
    state = read_state(path, meta)
    saved_optim = state["optimizer"]
    try:
        model.load_state_dict(state["model"], strict=True)  # cast into bf16 weights if need be
        if optimizer is not None and hasattr(optimizer, "load_main_state"):
            optimizer.load_main_state(state["model"])  # the exact fp32 values (or an fp32 run's)
        if optimizer is not None and saved_optim is not None:  # None: a model-only checkpoint
            distributed = hasattr(optimizer, "load_sharded_state_dict")
            if "distributed_optimizer" in saved_optim and not distributed:
                raise ValueError(
                    "the optimizer state was written with parallel.distributed_optimizer true; resume "
                    "with it (any data-parallel size)"
                )
            if distributed:  # a plain state is sharded using the model state to name its positions
                optimizer.load_state_dict(saved_optim, model_state=state["model"])
            else:
                optimizer.load_state_dict(saved_optim)
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint file {path} does not fit this run: {reason}") from None
    if optimizer is not None and saved_optim is not None and getattr(optimizer, "needs_shard_files", False):
        _load_optimizer_shard(iteration_dir(root, iteration), optimizer, dims, rank)
    rng_path = iteration_dir(root, iteration) / "rng" / f"rank_{rank:05d}.pt"
    same_world = meta is not None and meta.get("world_size") == dims.world_size
    if same_world and not rng_path.is_file():
        raise CheckpointError(f"checkpoint file {rng_path} is missing (RNG state of rank {rank})")
    if rng_path.is_file():  # absent when resuming on another world size: keep the fresh seeds
        set_rng_state(read_state(rng_path, meta))
    return {
        "iteration": int(state["iteration"]),
        "consumed_samples": int(state["consumed_samples"]),
        "extra": state.get("extra", {}),
        "ema": state.get("ema"),
        "path": path,
    }


def _load_optimizer_shard(iter_dir: Path, optimizer, dims: ParallelDims, rank: int) -> None:
    """Load this rank's distributed-optimizer states: its own ``distrib_optim_dpDDD.pt`` when the
    checkpoint has this run's layout, else resharded from every file that holds its parameters."""
    if optimizer.same_layout():
        path = distrib_optim_path(iter_dir, dims, rank)
        state = read_state(path, read_metadata(iter_dir))  # CheckpointError naming a missing/bad file
        try:
            optimizer.load_sharded_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint file {path} does not fit this run: {reason}") from None
        return
    sources = optimizer_shard_sources(iter_dir, dims, rank)
    try:
        optimizer.load_resharded(sources)
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{iter_dir}: cannot reshard the distributed optimizer: {reason}") from None


def optimizer_shard_sources(iter_dir: Path, dims: ParallelDims, rank: int) -> list[tuple[bool, bool, dict]]:
    """Every distributed-optimizer file that can hold this rank's states, with what it can hold.

    Dense parameters are replicated over data parallelism, so any file of a rank with the same
    (tp, pp) coordinates holds pieces of them; experts only in files of the same (ep, etp, pp).
    Shard directory names do not depend on the data-parallel size, so the old run's files are
    found under this run's names.
    """
    me, dirs = dims.coords(rank), {}
    for r in range(dims.world_size):
        c = dims.coords(r)
        dense, expert = (c.tp, c.pp) == (me.tp, me.pp), (c.ep, c.etp, c.pp) == (me.ep, me.etp, me.pp)
        if dense or expert:
            name = shard_name(dims, r)
            old = dirs.get(name, (False, False))
            dirs[name] = (old[0] or dense, old[1] or expert)
    sources, meta = [], read_metadata(iter_dir)
    for name, (dense, expert) in sorted(dirs.items()):
        files = sorted((iter_dir / name).glob(DISTRIB_OPTIM_FILE.replace("{:03d}", "*")))
        if not files:
            raise CheckpointError(f"{iter_dir / name}: no distributed-optimizer shard files")
        sources += [(dense, expert, read_state(f, meta)) for f in files]
    return sources

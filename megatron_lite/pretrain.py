"""Pretrain a Mistral/Mixtral model.

Usage::

    python -m megatron_lite.pretrain --config FILE [--section.field value ...]
    python -m megatron_lite.pretrain --tensor-model-parallel-size 2 --num-layers 32 ...  (Megatron-LM names)
    torchrun --nproc-per-node N -m megatron_lite.pretrain --config FILE --parallel.tensor T ...

Exit status:
    0  done (``training.train_iters`` or ``training.exit_interval`` reached).
    1  an error stopped the run: one ``checkpoint error:``, ``data error:``, ``training error:``
       (non-finite loss or gradients) or ``distributed error:`` (a collective timed out after
       ``training.dist_timeout_minutes``: a rank froze or died) line, then exit; other crashes
       keep their traceback.
    2  configuration error: one ``config error: ...`` line, before any process group or tensor.
    3  stopped on a signal (SIGTERM: preemption, time limit) after saving a checkpoint: requeue
       the job to continue. ``<logging.run_dir>/requeue`` is written too, because torchrun
       reports its own status after forwarding a signal.

Under torchrun every rank meets the same config, data, checkpoint and training errors; only
global rank 0 prints them (a token id error found in one data-parallel rank's batch, and
distributed errors, are printed by the rank that saw them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_lite.config import ConfigError, main_argv_to_config
from megatron_lite.data.indexed_dataset import DatasetError
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.health import TrainingError
from megatron_lite.training.runtime import check_run_config, env_world_size, init_runtime, shutdown
from megatron_lite.training.setup import setup_training
from megatron_lite.training.signals import ExitSignal

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_REQUEUE = 0, 1, 2, 3
REQUEUE_MARKER = "requeue"  # in logging.run_dir: the run stopped on a signal after saving


def _report(kind: str, exc: BaseException, rank: int, every_rank: bool = False) -> None:
    """Print ``kind error: message`` once per job (rank 0), or on this rank when only it knows."""
    if rank == 0 or every_rank or getattr(exc, "local", False):
        where = f" (rank {rank})" if rank != 0 else ""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{kind} error{where}: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run pretraining from command-line arguments; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from megatron_lite.config_help import config_help

        print(__doc__)
        print(config_help())
        return EXIT_OK
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = main_argv_to_config(argv)
        check_run_config(cfg, env_world_size())
    except ConfigError as exc:
        _report("config", exc, rank)
        return EXIT_CONFIG
    marker = Path(cfg.logging.run_dir) / REQUEUE_MARKER
    if rank == 0:
        cfg.save(Path(cfg.logging.run_dir) / "config.yaml")
        marker.unlink(missing_ok=True)
    try:
        runtime = init_runtime(cfg)
    except dist.DistError as exc:
        _report("distributed", exc, rank, every_rank=True)
        return EXIT_ERROR
    exit_signal = ExitSignal().install() if cfg.training.exit_signal_handler else None
    trainer = None
    try:
        trainer = setup_training(cfg, runtime, exit_signal=exit_signal)
        trainer.train()
        trainer.writers.close()
    except ConfigError as exc:  # found while building data (e.g. tokenizer larger than the vocabulary)
        _report("config", exc, rank)
        return EXIT_CONFIG
    except CheckpointError as exc:
        _report("checkpoint", exc, rank)
        return EXIT_ERROR
    except (FileNotFoundError, DatasetError) as exc:
        _report("data", exc, rank)
        return EXIT_ERROR
    except TrainingError as exc:
        _report("training", exc, rank)
        return EXIT_ERROR
    except RuntimeError as exc:
        if not _is_comm_failure(exc):
            raise
        minutes = cfg.training.dist_timeout_minutes
        reason = str(exc).strip().splitlines()[0].split("] ")[-1]  # drop gloo's source location
        reason = reason.split(". This is typically")[0]  # and its advice
        text = f"{reason}: a rank froze or died (training.dist_timeout_minutes is {minutes})"
        _report("distributed", RuntimeError(text), rank, every_rank=True)
        return EXIT_ERROR
    finally:
        if exit_signal is not None:
            exit_signal.restore()
        if trainer is not None and trainer.save_lock is not None:
            trainer.save_lock.release()
        _shutdown_quietly(runtime)
    if trainer.stopped_on_signal and cfg.training.save:
        if rank == 0:
            marker.write_text(f"{trainer.iteration}\n")
        return EXIT_REQUEUE
    return EXIT_OK


def _is_comm_failure(exc: RuntimeError) -> bool:
    """A collective that timed out or lost its peer (gloo raises plain RuntimeErrors for both)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("Timed out", "timed out", "Connection closed by peer", "Connection reset"))


def _shutdown_quietly(runtime) -> None:
    """Tear the process group down; after a timeout or a dead peer that can fail too (ignored)."""
    try:
        shutdown(runtime)
    except Exception:  # noqa: BLE001 - the run's own error was already reported
        pass


if __name__ == "__main__":
    sys.exit(main())

"""Assemble a ``Trainer`` from a config: model, optimizer, schedule, resume, data streams, writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_lite.config import Config
from megatron_lite.training import checkpoint, metrics, save_dir
from megatron_lite.training.convert import load_initial_weights
from megatron_lite.training.data import BatchStream, build_datasets, epoch_warnings
from megatron_lite.training.distributed_optimizer import build_data_parallel
from megatron_lite.training.ema import build_ema, restore_ema
from megatron_lite.training.logging import MetricWriters
from megatron_lite.training.lr_schedule import build_scheduler
from megatron_lite.training.model_setup import build_local_model
from megatron_lite.training.optimizer import DynamicLossScaler
from megatron_lite.training.runtime import Runtime
from megatron_lite.training.trainer import Trainer


def num_microbatches(cfg: Config, dp: int) -> int:
    """Microbatches per rank per iteration: ``global_batch_size / (micro_batch_size * dp)``."""
    return cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp)


def setup_training(
    cfg: Config, runtime: Runtime, log: Callable[[str], None] = print, exit_signal=None
) -> Trainer:
    """Build everything a run needs on this rank, resuming from ``training.load`` when it has a checkpoint.

    Args:
        cfg: config that passed ``check_run_config`` (global batch size resolved).
        runtime: from ``init_runtime``.
        log: line sink (only the logging rank's lines are shown).
        exit_signal: an installed ``ExitSignal`` the trainer checks between iterations, or None.

    The save directory is checked, cleaned and locked first (``save_dir.prepare``); the lock is
    ``trainer.save_lock`` (release it when the run ends).

    Raises:
        CheckpointError: ``training.load`` names a missing or unreadable checkpoint, or
            ``training.save`` is unusable (not writable, full, locked by another run).
    """
    say = log if runtime.is_logging_rank else (lambda _line: None)
    lock = None
    if cfg.training.save:
        say0 = log if runtime.rank == 0 else (lambda _line: None)
        params = metrics.total_params(cfg.model)
        lock = save_dir.prepare(cfg.training.save, params, say0, runtime.rank == 0, runtime.gather_objects)
    try:
        trainer = _build(cfg, runtime, log, say, exit_signal)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.save_lock = lock
    return trainer


def _build(cfg: Config, runtime: Runtime, log, say, exit_signal) -> Trainer:
    model = build_local_model(cfg, runtime)
    load = cfg.training.load
    if cfg.training.initial_load and not (load and checkpoint.latest_iteration(load) is not None):
        # Into the fp32 model, before the optimizer copies its main parameters and casts the weights.
        what = load_initial_weights(model, cfg.training.initial_load, cfg, runtime.dims)
        say(f" > initial weights from {cfg.training.initial_load} ({what})")
    grad_sync, optimizer = build_data_parallel(model, cfg, runtime.dims, runtime.precision)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.training.train_iters)
    scaler = DynamicLossScaler(runtime.precision == "fp16")
    iteration, consumed, consumed_valid, state = 0, 0, 0, None
    if cfg.training.load:
        state = _resume(cfg, model, optimizer, scheduler, runtime, say)
        if state is not None:
            iteration, consumed = state["iteration"], state["consumed_samples"]
            consumed_valid = int(state["extra"].get("consumed_valid_samples", 0))
            if "scaler" in state["extra"]:
                scaler.load_state_dict(state["extra"]["scaler"])
            _say_schedule_change(cfg, state["extra"], say)
    ema = build_ema(cfg, optimizer, model)  # after the resume: it starts from the loaded main values
    restore_ema(ema, state, say)
    train, valid, _test, eod = build_datasets(cfg)
    dims, mbs = runtime.dims, cfg.training.micro_batch_size
    m = num_microbatches(cfg, dims.dp)
    vocab = cfg.model.vocab_size
    stream = BatchStream(
        train,
        consumed,
        mbs,
        m,
        dims.local.dp,
        dims.dp,
        cfg.data,
        eod,
        runtime.device,
        vocab_size=vocab,
        context=(dims.local.cp, dims.cp),
    )
    for line in epoch_warnings(train, "train") if train is not None else []:
        say(line)
    valid_stream = None
    if cfg.training.eval_interval and valid is not None and len(valid) > 0:
        if consumed_valid >= len(valid):  # resumed with another eval_interval/eval_iters
            say(
                f" > validation restarts at sample 0 ({consumed_valid} consumed, "
                f"this run's split has {len(valid)})"
            )
        valid_stream = BatchStream(
            valid,
            consumed_valid,
            mbs,
            m,
            dims.local.dp,
            dims.dp,
            cfg.data,
            eod,
            runtime.device,
            vocab_size=vocab,
            cycle=True,
            context=(dims.local.cp, dims.cp),
        )
    writers = MetricWriters(cfg.logging, enabled=runtime.is_logging_rank, run_config=cfg.to_dict())
    local_params = sum(p.numel() for p in model.parameters())
    say(
        f" > model: {cfg.model.arch}, {metrics.total_params(cfg.model):,} parameters "
        f"({local_params:,} on this rank), {metrics.flops_per_token(cfg.model, cfg.data.seq_length):.4g} "
        "FLOPs/token"
    )
    say(
        f" > {dims!r}, device {runtime.device}, precision {runtime.precision}, "
        f"{m} microbatch(es) of {mbs} per rank, global batch {cfg.training.global_batch_size}"
    )
    trainer = Trainer(
        cfg,
        runtime,
        model,
        optimizer,
        scheduler,
        stream,
        valid_stream,
        iteration=iteration,
        scaler=scaler,
        writers=writers,
        log=log,
        grad_sync=grad_sync,
        exit_signal=exit_signal,
        ema=ema,
    )
    if cfg.training.objective == "dpo":  # reference log-probs: the sidecar, or a pass now
        from megatron_lite.training.reference import attach_reference_logps

        attach_reference_logps(trainer, [train, valid], eod, state is not None, say)
    return trainer


def _say_schedule_change(cfg: Config, extra: dict, say) -> None:
    """Tell the user when a resumed run's length differs from the checkpoint's (the LR schedule
    follows this run's ``train_iters``/``lr_decay_iters``, so it stretches or shrinks)."""
    old = extra.get("train_iters")
    new = cfg.training.train_iters
    if old is None or int(old) == new:
        return
    how = "stretches" if new > int(old) else "shrinks"
    decay = cfg.optimizer.lr_decay_iters
    over = f"optimizer.lr_decay_iters {decay}" if decay is not None else f"train_iters {new}"
    say(
        f" > training.train_iters changed from {old} (checkpoint) to {new}: the LR schedule {how} "
        f"(warmup and decay now run over {over})"
    )


def _resume(cfg: Config, model, optimizer, scheduler, runtime: Runtime, say) -> dict | None:
    """Load the latest checkpoint of ``training.load``.

    A load directory without a tracker file is an error, except when it is also the save
    directory (the usual auto-resume setup: the first launch finds nothing and starts fresh).
    """
    load = Path(cfg.training.load)
    if checkpoint.latest_iteration(load) is None:
        if cfg.training.save and Path(cfg.training.save).resolve() == load.resolve():
            say(f" > no checkpoint in {load} yet, starting from scratch")
            return None
        raise checkpoint.CheckpointError(f"checkpoint tracker {load / checkpoint.TRACKER} is missing")
    state = checkpoint.load(load, model, optimizer, scheduler, runtime.dims)
    if state["extra"].get("model_only"):
        say(f" > loaded converted weights from {load} (fresh optimizer and schedule)")
        return state
    say(
        f" > resumed from {load} at iteration {state['iteration']} "
        f"({state['consumed_samples']} samples consumed)"
    )
    return state

"""The training loop: microbatch accumulation, clipping, optimizer step, eval, logging, checkpoints.

Loss normalisation (what one iteration minimises): the mean token loss over every loss-mask token
of the global batch, across all microbatches and data-parallel ranks,

    L = sum_{all tokens t of the global batch} mask_t * loss_t / N,   N = sum mask_t (all-reduced over DP)

(with context parallelism each rank holds part of every sequence: N and the gradients are summed
over dp x cp, so the same objective holds token for token)

as Megatron-core does with per-token loss. Microbatch ``m`` on a rank back-propagates
``sum_{t in m} mask_t * loss_t / N`` and the data-parallel reduce SUMS gradients. Since ``N`` is
known before the first backward, the accumulated gradient equals that of one big batch exactly,
whatever the microbatch split, the data-parallel size or the number of masked tokens per
microbatch (a per-microbatch mean would weight tokens of sparse microbatches more).

MoE auxiliary losses: the routing statistics of microbatch ``j`` are summed over all ranks of the
stage (``parallelize`` installs that reduce), so each aux loss describes the union of the DP
ranks' ``j``-th microbatches and every rank back-propagates its own tokens' share. A weight of
``1 / num_microbatches`` then makes the objective hold the mean aux loss over those ``M`` joint
microbatches, exactly as one process with micro-batch ``mbs * dp`` would.

Pipeline parallelism (``parallel.pipeline > 1``): ``pipeline_step.PipelineStep`` replaces
``forward_backward`` with the same objective; the executor walks this rank's schedule, the loss is
computed on the last stage and summed over the pipeline group, so every rank returns the same
statistics.

Objectives (``training.objective``, ``objectives.py``): the objective supplies ``N`` (loss-mask
tokens for pretrain/sft; preference pairs for dpo, which normalises per pair) and each
microbatch's loss sum; the rules above hold unchanged with that ``N``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml
from torch import nn

from megatron_lite.config import Config
from megatron_lite.training import checkpoint, metrics
from megatron_lite.training.health import StepGuard, TrainingError
from megatron_lite.training.logging import (
    MetricWriters,
    TrainLogStats,
    format_train_line,
    format_validation_lines,
)
from megatron_lite.training.lr_schedule import LRScheduler
from megatron_lite.training.model_setup import grad_norm_groups, masked_loss_sum, reduce_gradients
from megatron_lite.training.objectives import Objective, build_objective
from megatron_lite.training.optimizer import DynamicLossScaler, clip_grads
from megatron_lite.training.pipeline_step import PipelineStep
from megatron_lite.training.runtime import Runtime


def microbatch_loss_sum(
    model: nn.Module, batch, runtime: Runtime, objective: Objective | None = None
) -> torch.Tensor:
    """Forward one microbatch; return ``sum(token_loss * loss_mask)`` as an fp32 scalar (with graph).

    With an ``objective``, its ``loss_sum`` instead (e.g. the summed DPO loss of the pairs).
    """
    logits = model(
        batch.tokens,
        position_ids=batch.position_ids,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
    )
    if objective is not None:
        return objective.loss_sum(logits, batch, model)
    return masked_loss_sum(logits, batch.labels, batch.loss_mask, model)


def forward_backward(
    model: nn.Module,
    microbatches: list,
    runtime: Runtime,
    loss_weight: float,
    grad_scale: float = 1.0,
    objective: Objective | None = None,
) -> torch.Tensor:
    """Accumulate gradients of ``loss_weight * sum_m loss_sum_m`` (times ``grad_scale`` for fp16).

    MoE layers get ``aux_loss_scale = grad_scale / num_microbatches``. ``objective`` replaces the
    masked token loss (``microbatch_loss_sum``).

    Returns:
        Detached fp32 ``[3]``: the microbatches' summed masked token losses, and the load-balancing
        and z losses averaged over MoE layers and microbatches (zeros for a dense model).
    """
    moe = model.moe_layers() if hasattr(model, "moe_layers") else []
    for layer in moe:
        layer.aux_loss_scale = grad_scale / len(microbatches)
    totals = torch.zeros(3, dtype=torch.float32, device=runtime.device)
    for batch in microbatches:
        loss_sum = microbatch_loss_sum(model, batch, runtime, objective)
        (loss_sum * (loss_weight * grad_scale)).backward()
        totals[0] += loss_sum.detach()
        stats = [(m.last_aux_loss, m.last_z_loss) for m in moe if m.last_aux_loss is not None]
        if stats:
            totals[1] += torch.stack([a.float() for a, _ in stats]).mean() / len(microbatches)
            totals[2] += torch.stack([z.float() for _, z in stats]).mean() / len(microbatches)
    return totals


@dataclass
class StepResult:
    """What one iteration produced (floats on every rank, after the DP reduction)."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_tokens: int
    aux_loss: float | None = None
    z_loss: float | None = None
    objective_metrics: dict[str, float] = field(default_factory=dict)  # e.g. DPO's rewards/*


@dataclass
class _Interval:
    """Sums over the current logging interval."""

    iters: int = 0
    loss: float = 0.0
    aux: float = 0.0
    z: float = 0.0
    grad_norm: float = 0.0
    skipped: int = 0
    nan: int = 0
    bad_norm: float = 0.0  # the last skipped iteration's (non-finite) gradient norm
    objective: dict[str, float] = field(default_factory=dict)  # summed objective metrics
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Runs ``training.train_iters`` iterations from ``iteration`` on.

    Args:
        cfg: validated config with ``training.global_batch_size`` resolved.
        runtime: device/precision/rank layout.
        model, optimizer, scheduler: the local training state.
        train_stream, valid_stream: ``BatchStream``s (``valid_stream`` may be None).
        iteration: completed iterations (non-zero after resume).
        scaler: fp16 loss scaler (disabled otherwise).
        writers: TensorBoard/wandb writers.
        log: where lines go (print on the logging rank).
        grad_sync: the model's data-parallel gradient buffers (``parallel.grad_buffer.GradSync``), or
            None to reduce with ``allreduce_gradients`` after the backward.
        exit_signal: a ``training.signals.ExitSignal`` checked between iterations (save and stop
            when any rank got one), or None.
        ema: a ``training.ema.WeightEMA`` updated after every applied step and saved, or None.
    """

    def __init__(
        self,
        cfg: Config,
        runtime: Runtime,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        train_stream,
        valid_stream=None,
        iteration: int = 0,
        scaler: DynamicLossScaler | None = None,
        writers: MetricWriters | None = None,
        log: Callable[[str], None] = print,
        grad_sync=None,
        exit_signal=None,
        ema=None,
    ):
        self.cfg, self.runtime, self.model = cfg, runtime, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_stream, self.valid_stream = train_stream, valid_stream
        self.iteration = iteration
        self.scaler = scaler or DynamicLossScaler(runtime.precision == "fp16")
        self.writers = writers or MetricWriters(cfg.logging, enabled=False)
        self._log = log if runtime.is_logging_rank else (lambda _line: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norm_groups = grad_norm_groups(model, runtime)
        self.grad_sync, self.exit_signal, self.ema = grad_sync, exit_signal, ema
        if hasattr(optimizer, "main_norm_groups"):  # fp32 main params (mixed precision, ZeRO-1 shards)
            self.norm_groups = optimizer.main_norm_groups(self.norm_groups)
            self.params = optimizer.main_params
        self.flops_per_token = metrics.flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak = metrics.device_peak_tflops(runtime.device, cfg.logging.peak_tflops)
        self.is_moe = bool(getattr(model, "moe_layers", list)())
        self.objective = build_objective(cfg)
        # pp > 1: the executor walks this rank's schedule over its model chunks.
        self.pipeline = (
            PipelineStep(cfg, runtime, model, grad_sync, self.objective) if runtime.dims.pp > 1 else None
        )
        self.history: list[StepResult] = []
        self.guard = StepGuard(self.scaler, cfg.training.max_consecutive_skips)
        self.stopped_on_signal = False  # train() left early on a signal (pretrain exits for a requeue)
        self.save_lock = None  # the save directory's lock (``save_dir``), released by train()

    # ------------------------------------------------------------------ one iteration

    def train_step(self, microbatches: list) -> StepResult:
        """Forward/backward all microbatches, reduce, clip, step (or skip on a non-finite norm)."""
        rt = self.runtime
        if self.grad_sync is not None:
            self.grad_sync.start_step(len(microbatches))  # zero; arm the overlap hooks
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.objective.start_step(rt.device)
        # N: loss-mask tokens (pretrain/sft) or preference pairs (dpo) of the global batch
        num_tokens = float(rt.all_reduce_dp(self.objective.denominator(microbatches).to(rt.device)))
        loss_weight = 1.0 / max(num_tokens, 1.0)
        if self.pipeline is not None:
            loss_sum = self.pipeline.forward_backward(microbatches, loss_weight, self.scaler.scale)
        else:
            loss_sum = forward_backward(
                self.model, microbatches, rt, loss_weight, self.scaler.scale, self.objective
            )
        reduce_gradients(self.model, rt, self.grad_sync)
        self.scaler.unscale_(self.params)
        grad_norm = clip_grads(self.norm_groups, self.cfg.optimizer.clip_grad, rt.device, self.params)
        lr = self.scheduler.lr
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.guard.note_gradients(self.model)  # before the grads are dropped
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            if self.ema is not None:  # applied steps only: a skipped fp16 step changes no weight
                self.ema.update()
            self.scheduler.step()  # as Megatron: a skipped step does not advance the schedule
        self.scaler.update(skipped)
        # aux/z are the same on every cp rank (routing statistics are summed over the stage)
        replicas = float(rt.dims.dp * rt.dims.cp)
        stats = rt.all_reduce_dp(loss_sum) / torch.tensor([1.0, replicas, replicas], device=rt.device)
        aux, z = (float(stats[1]), float(stats[2])) if self.is_moe else (None, None)
        extra = self.objective.finish_step(rt, num_tokens)
        return StepResult(
            float(stats[0]) / max(num_tokens, 1.0), grad_norm, lr, skipped, int(num_tokens), aux, z, extra
        )

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``training.eval_iters`` global batches of the validation stream.

        Token-mean cross entropy for pretrain/sft; the pair-mean DPO loss for dpo.
        """
        if self.valid_stream is None:
            return None
        self.model.eval()
        sums = torch.zeros(2, device=self.runtime.device)
        for _ in range(self.cfg.training.eval_iters):
            batches = self.valid_stream.next()
            if self.pipeline is not None:
                sums[0] += self.pipeline.loss_sum(batches)  # summed over the pipeline group
                sums[1] += self.objective.denominator(batches).to(sums)[0]
                continue
            for batch in batches:
                sums[0] += microbatch_loss_sum(self.model, batch, self.runtime, self.objective)
                sums[1] += self.objective.denominator([batch]).to(sums)[0]
        self.model.train()
        sums = self.runtime.all_reduce_dp(sums)
        return float(sums[0] / sums[1].clamp(min=1))

    def _validate(self) -> None:
        loss = self.evaluate()
        if loss is None:
            return
        name = self.objective.loss_name
        for line in format_validation_lines(self.iteration, {name: loss}):
            self._log(line)
        self.writers.scalars({f"lm-loss-validation/{name}": loss}, self.iteration)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[StepResult]:
        """Train until ``train_iters`` (or ``exit_interval``); returns this call's per-iteration results.

        The save directory's lock (``save_lock``) is released when training ends, however it ends.
        """
        try:
            return self._train_loop()
        finally:
            if self.save_lock is not None:
                self.save_lock.release()

    def _train_loop(self) -> list[StepResult]:
        tr, rt = self.cfg.training, self.runtime
        interval = _Interval()
        first, saved_at, started = self.iteration, self.iteration, time.perf_counter()
        while self.iteration < tr.train_iters:
            result = self.train_step(self.train_stream.next())
            self.iteration += 1
            self.history.append(result)
            self._accumulate(interval, result)
            try:
                self.guard.check(result, self.iteration)
            except TrainingError:
                self._log_interval(interval)  # the bad iteration's line, with its real loss
                raise
            if self.iteration % self.cfg.logging.log_interval == 0 or self.iteration == tr.train_iters:
                self._log_interval(interval)  # the last iteration is logged even off the interval
                interval = _Interval()
            paused = time.perf_counter()  # evaluation and checkpoints do not count as iteration time
            if tr.eval_interval and self.iteration % tr.eval_interval == 0:
                self._validate()
            if tr.save and tr.save_interval and self.iteration % tr.save_interval == 0:
                saved_at = self.save()
            interval.start += time.perf_counter() - paused
            if tr.exit_interval and self.iteration % tr.exit_interval == 0:
                self._log(f"exiting after iteration {self.iteration} (training.exit_interval)")
                break
            if self.exit_signal is not None and self.exit_signal.any_rank(rt.device, rt.distributed):
                self._log(
                    f"exiting after iteration {self.iteration} on a signal (training.exit_signal_handler)"
                )
                self.stopped_on_signal = True
                break
        if interval.iters:  # stopped early (exit interval, signal) between log lines
            self._log_interval(interval)
        if tr.save and saved_at != self.iteration and self.iteration > first:
            saved_at = self.save()
        if self.grad_sync is not None:
            self.grad_sync.wait_param_gather()  # the model's weights are complete when train returns
        self._log_summary(first, started, saved_at)
        return self.history

    def _log_summary(self, first: int, started: float, saved_at: int) -> None:
        """One closing line: iterations, tokens, wall time and where the checkpoint is."""
        done = self.iteration - first
        tokens = done * self.cfg.training.global_batch_size * self.cfg.data.seq_length * self.objective.rows
        where = "no checkpoint (training.save is not set)"
        if self.cfg.training.save and saved_at == self.iteration:
            where = f"checkpoint: {checkpoint.iteration_dir(self.cfg.training.save, saved_at)}"
        self._log(
            f"training done: {done} iterations ({first} -> {self.iteration}), {tokens} tokens, "
            f"{time.perf_counter() - started:.1f} s wall time, {where}"
        )

    def _accumulate(self, it: _Interval, r: StepResult) -> None:
        it.iters += 1
        it.loss += r.loss  # a skipped iteration's real loss too (nan/inf shows in the line)
        if r.skipped:
            it.skipped += 1
            it.nan += int(not math.isfinite(r.loss))
            it.bad_norm = r.grad_norm
            return
        it.grad_norm += r.grad_norm
        it.aux += r.aux_loss or 0.0
        it.z += r.z_loss or 0.0
        for k, v in r.objective_metrics.items():
            it.objective[k] = it.objective.get(k, 0.0) + v

    def _log_interval(self, it: _Interval) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)
        seconds = (time.perf_counter() - it.start) / max(it.iters, 1)
        good = max(it.iters - it.skipped, 1)
        gbs, seq = self.cfg.training.global_batch_size, self.cfg.data.seq_length * self.objective.rows
        tok_s, tflops, mfu = metrics.throughput(
            gbs * seq, seconds, self.runtime.world_size, self.flops_per_token, self.peak
        )
        consumed = self.train_stream.consumed_samples
        moe = self.is_moe
        stats = TrainLogStats(
            iteration=self.iteration,
            train_iters=self.cfg.training.train_iters,
            consumed_samples=consumed,
            consumed_tokens=consumed * seq,
            ms_per_iter=seconds * 1e3,
            lr=self.history[-1].lr,
            global_batch_size=gbs,
            lm_loss=it.loss / max(it.iters, 1),
            grad_norm=it.grad_norm / good if it.iters > it.skipped else it.bad_norm,
            tokens_per_s=tok_s,
            tflops=tflops,
            mfu=mfu,
            mem_gib=metrics.memory_gib(self.runtime.device),
            skipped_iters=it.skipped,
            nan_iters=it.nan,
            load_balancing_loss=it.aux / good if moe else None,
            z_loss=it.z / good if moe else None,
            loss_scale=self.scaler.scale if self.scaler.enabled else None,
            loss_name=self.objective.loss_name,
        )
        objective = {k: v / good for k, v in it.objective.items()}
        self._log(format_train_line(stats) + "".join(f" | {k}: {v:.4f}" for k, v in objective.items()))
        self.writers.scalars(
            {
                "lm loss": stats.lm_loss,
                "learning-rate": stats.lr,
                "grad-norm": stats.grad_norm,
                "tokens-per-sec-per-gpu": tok_s,
                "tflops-per-gpu": tflops,
                "mfu": mfu,
                "mem-gib": stats.mem_gib,
                "load-balancing-loss": stats.load_balancing_loss,
                "z-loss": stats.z_loss,
                **objective,
            },
            self.iteration,
        )

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> int:
        """Checkpoint the current state into ``training.save``; returns the iteration saved."""
        if self.grad_sync is not None:
            self.grad_sync.wait_param_gather()
        valid = self.valid_stream.consumed_samples if self.valid_stream is not None else 0
        path = checkpoint.save(
            self.cfg.training.save,
            self.iteration,
            self.model,
            self.optimizer,
            self.scheduler,
            self.train_stream.consumed_samples,
            config_yaml(self.cfg),
            self.runtime.dims,
            barrier=self.runtime.barrier,
            extra={
                "consumed_valid_samples": valid,
                "scaler": self.scaler.state_dict(),
                "train_iters": self.cfg.training.train_iters,
            },
            keep_last=self.cfg.training.keep_last_checkpoints,
            gather=self.runtime.gather_objects,
            ema=self.ema,
        )
        self._log(f"saved checkpoint at iteration {self.iteration:7d} to {path}")
        return self.iteration


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (what ``Config.save`` writes)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

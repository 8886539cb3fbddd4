"""Megatron-shaped progress lines, plus optional TensorBoard and Weights & Biases writers.

The line layout (field names, ``{:8d}`` iteration, ``{:.6E}`` losses) matches what Megatron log
parsers expect, so existing tooling reads our logs. ``wandb`` is imported in this module only
(DESIGN.md principle 7); TensorBoard goes through ``torch.utils.tensorboard`` and needs the
``tensorboard`` package. Requesting either without the package fails at start
(``check_backends``), before any process group exists.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from megatron_lite.config import ConfigError, LoggingConfig


@dataclass
class TrainLogStats:
    """What one log line reports (losses and times averaged over the logging interval)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    consumed_tokens: int
    ms_per_iter: float
    lr: float
    global_batch_size: int
    lm_loss: float
    grad_norm: float | None
    tokens_per_s: float
    tflops: float
    mfu: float | None
    mem_gib: float
    skipped_iters: int = 0
    nan_iters: int = 0
    load_balancing_loss: float | None = None
    z_loss: float | None = None
    loss_scale: float | None = None
    loss_name: str = "lm loss"  # "dpo loss" under training.objective dpo


def format_train_line(s: TrainLogStats) -> str:
    """One progress line, e.g. `` iteration       10/     100 | consumed samples: ... | mem: 1.2 GiB``."""
    items = [
        f" iteration {s.iteration:8d}/{s.train_iters:8d}",
        f"consumed samples: {s.consumed_samples:12d}",
        f"consumed tokens: {s.consumed_tokens:14d}",
        f"elapsed time per iteration (ms): {s.ms_per_iter:.1f}",
        f"learning rate: {s.lr:.6E}",
        f"global batch size: {s.global_batch_size:5d}",
        f"{s.loss_name}: {s.lm_loss:.6E}",
    ]
    if s.load_balancing_loss is not None:
        items.append(f"load balancing loss: {s.load_balancing_loss:.6E}")
    if s.z_loss is not None:
        items.append(f"z loss: {s.z_loss:.6E}")
    if s.loss_scale is not None:
        items.append(f"loss scale: {s.loss_scale:.1f}")
    if s.grad_norm is not None:
        items.append(f"grad norm: {s.grad_norm:.3f}")
    items += [
        f"number of skipped iterations: {s.skipped_iters:3d}",
        f"number of nan iterations: {s.nan_iters:3d}",
        f"tokens/s/GPU: {s.tokens_per_s:.0f}",
        f"TFLOP/s/GPU: {s.tflops:.1f}",
        "MFU: n/a" if s.mfu is None else f"MFU: {s.mfu:.2f}%",
        f"mem: {s.mem_gib:.1f} GiB",
    ]
    return " | ".join(items)


def format_validation_lines(iteration: int, losses: dict[str, float]) -> list[str]:
    """Megatron's framed ``validation loss at iteration N | lm loss value: ... | lm loss PPL: ...`` block."""
    body = f" validation loss at iteration {iteration} |"
    for key, value in losses.items():
        body += f" {key} value: {value:.6E} |"
        if key == "lm loss":  # a perplexity only for the token cross entropy
            body += f" {key} PPL: {math.exp(min(20.0, value)):.6E} |"
    rule = "-" * len(body)
    return [rule, body, rule]


def check_backends(cfg: LoggingConfig) -> None:
    """Fail early (ConfigError naming the package) when a requested logger is not installed."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logging.tensorboard is true but the 'tensorboard' package is not installed "
            "(pip install tensorboard)"
        )
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logging.wandb_project ({cfg.wandb_project!r}) is set but the 'wandb' package "
            "is not installed (pip install wandb)"
        )


class MetricWriters:
    """Scalars to TensorBoard and/or wandb; a no-op when neither is configured or on non-logging ranks.

    Args:
        cfg: logging section (``run_dir`` holds the TensorBoard event files).
        enabled: whether this rank writes (only one rank should).
        run_config: the resolved config, recorded with the wandb run.
    """

    def __init__(self, cfg: LoggingConfig, enabled: bool, run_config: dict[str, Any] | None = None):
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=f"{cfg.run_dir}/tensorboard")
        if cfg.wandb_project:
            import wandb

            self._wandb = wandb.init(project=cfg.wandb_project, dir=cfg.run_dir, config=run_config)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        """Record every non-None value under its key at ``step``."""
        values = {k: v for k, v in values.items() if v is not None}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

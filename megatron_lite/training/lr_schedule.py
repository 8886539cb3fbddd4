"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to ``min_lr``.

Semantics follow Megatron's iteration-based schedule: with ``W`` warmup steps and decay ending at
step ``D``, the rate at step ``n`` (0-based count of optimizer steps already taken) is

* ``n <= W`` (and ``W > 0``): ``lr * n / W`` (so the very first step of a warmed-up run uses 0);
* constant style after warmup: ``lr``;
* ``n > D``: ``min_lr``;
* otherwise with ``r = (n - W) / (D - W)``: ``min_lr + (lr - min_lr) * c(r)`` where
  ``c = 1 - r`` (linear) or ``c = (1 + cos(pi r)) / 2`` (cosine).
"""

from __future__ import annotations

import math
from typing import Any

import torch


class LRScheduler:
    """Sets ``lr`` of every param group of an optimizer from the step count.

    Args:
        optimizer: the optimizer whose groups are updated (``None``: only compute values).
        max_lr: peak rate reached at the end of warmup.
        min_lr: floor of the decay.
        warmup_steps: linear warmup length in optimizer steps.
        decay_steps: step at which the decay reaches ``min_lr``.
        style: ``cosine``, ``linear`` or ``constant``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
        style: str = "cosine",
    ):
        if style not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr decay style {style!r} must be cosine, linear or constant")
        if style != "constant" and decay_steps <= warmup_steps:
            raise ValueError(f"lr decay steps ({decay_steps}) must exceed warmup steps ({warmup_steps})")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.style = style
        self.num_steps = 0
        self._apply()

    def lr_at(self, num_steps: int) -> float:
        """The learning rate after ``num_steps`` optimizer steps."""
        if self.warmup_steps > 0 and num_steps <= self.warmup_steps:
            return self.max_lr * num_steps / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if num_steps > self.decay_steps:
            return self.min_lr
        ratio = (num_steps - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    @property
    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.lr_at(self.num_steps)

    def step(self, increment: int = 1) -> None:
        """Advance after an optimizer step and write the new rate into the param groups."""
        self.num_steps += increment
        self._apply()

    def _apply(self) -> None:
        if self.optimizer is not None:
            lr = self.lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the hyper-parameters are kept to detect changes)."""
        return {
            "num_steps": self.num_steps,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "style": self.style,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the step count; hyper-parameters come from the current config (Megatron's default)."""
        self.num_steps = int(state["num_steps"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer | None, opt_cfg, train_iters: int) -> LRScheduler:
    """Scheduler from an ``OptimizerConfig``; ``lr_decay_iters`` defaults to ``train_iters``."""
    decay = opt_cfg.lr_decay_iters if opt_cfg.lr_decay_iters is not None else train_iters
    return LRScheduler(
        optimizer, opt_cfg.lr, opt_cfg.min_lr, opt_cfg.lr_warmup_iters, decay, opt_cfg.lr_decay_style
    )

"""Non-finite detection: a run whose loss or gradients went NaN/inf stops instead of training on.

bf16/fp32 have no loss scaler to blame, so the first non-finite loss or global gradient norm
stops the run; fp16 loss scaling skips overflowing steps by design (the scaler halves and tries
again), so only ``training.max_consecutive_skips`` skips in a row stop it. The loss and the norm
are already reduced over every rank, so every rank stops at the same iteration and none is left
waiting in a collective.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradients); the message names the iteration."""


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter whose gradient (or fp32 ``main_grad``) holds inf or NaN."""
    for name, p in model.named_parameters():
        for grad in (getattr(p, "main_grad", None), p.grad):
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return name
    return None


class StepGuard:
    """Checks every iteration's result (``Trainer.train_step``'s ``StepResult``).

    Args:
        scaler: the run's ``DynamicLossScaler`` (enabled only for fp16).
        max_consecutive_skips: fp16: how many skipped iterations in a row stop the run.
    """

    def __init__(self, scaler, max_consecutive_skips: int):
        self.scaler, self.limit = scaler, max_consecutive_skips
        self.consecutive_skips = 0
        self.nonfinite_grad: str | None = None  # this rank's first parameter with a non-finite grad

    def note_gradients(self, model: nn.Module) -> None:
        """Remember the first parameter with a non-finite gradient (call on a skipped step, before
        the gradients are zeroed: one pass over them, only when a step is skipped)."""
        self.nonfinite_grad = first_nonfinite_grad(model)

    def check(self, result, iteration: int) -> None:
        """Raise TrainingError when ``result`` (iteration ``iteration``) must stop the run.

        Raises:
            TrainingError: one line naming the iteration (and this rank's first parameter with a
                non-finite gradient when there is one).
        """
        finite = math.isfinite(result.loss) and math.isfinite(result.grad_norm)
        self.consecutive_skips = self.consecutive_skips + 1 if result.skipped else 0
        if finite and not result.skipped:
            return
        where = f"; first non-finite gradient: {self.nonfinite_grad}" if self.nonfinite_grad else ""
        what = f"iteration {iteration}: lm loss {result.loss}, grad norm {result.grad_norm}{where}"
        if not self.scaler.enabled:
            raise TrainingError(f"non-finite values at {what} (nothing saved from this state)")
        if self.consecutive_skips >= self.limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive skipped iterations (training.max_consecutive_skips "
                f"{self.limit}), last at {what}, loss scale {self.scaler.scale}"
            )

"""Stop cleanly on a signal: finish the iteration, checkpoint, exit (SLURM preemption, job limits).

SLURM sends SIGTERM before it kills a preempted or timed-out job (``--signal=TERM@120`` asks for
it early), and torchrun forwards SIGTERM to its workers. The handler only records the signal; the
trainer checks it between iterations, agrees on it with every rank (one all-reduce of a flag, so
no rank stops alone and leaves the others waiting in a collective), saves and leaves the loop.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

DEFAULT_SIGNALS = (signal.SIGTERM,)


class ExitSignal:
    """Records whether one of ``signals`` arrived; install with :meth:`install`."""

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> ExitSignal:
        """Replace the handlers of ``signals`` (the previous ones come back with :meth:`restore`)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, _frame) -> None:
        self.received = signum

    def any_rank(self, device: torch.device, distributed: bool) -> bool:
        """True on every rank when any rank received a signal (a MAX all-reduce over the world)."""
        if not distributed:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

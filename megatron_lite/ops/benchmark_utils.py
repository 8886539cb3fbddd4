"""Timing helpers shared by ``benchmarks/bench_moe_ops.py`` and ``benchmarks/bench_packed_seq.py``.

Bandwidth-bound ops are judged against a memory floor: the bytes an op must move divided by the
device-to-device copy bandwidth measured on the same device, so "percent of floor" reads as how
close the kernel is to a plain memcpy of the same traffic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds, with CUDA events on GPU.

    Args:
        fn: the work to time; its result is discarded.
        device: where it runs.
        warmup: untimed calls first (allocator, autotuning, lazy init).
        iters: timed calls; the median resists one-off hiccups.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def interleaved_ms(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    iters: int = 10,
    cpu_clock: bool = False,
) -> dict[str, list[float]]:
    """Times several closures in turns (A B A B ...), so load from other processes hits all alike.

    Args:
        cpu_clock: on CPU, count this process's CPU time instead of wall time: with one thread
            (OMP_NUM_THREADS=1) it is the work done, unaffected by waiting for a shared core.

    Returns:
        Each name's per-round times in milliseconds (CUDA events on GPU).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            if cpu_clock and device.type == "cpu":
                t0 = time.process_time()
                fn()
                samples[name].append((time.process_time() - t0) * 1e3)
            else:
                samples[name].append(time_ms(fn, device, warmup=0, iters=1))
    return samples


def ratio_summary(base: list[float], other: list[float]) -> dict[str, float]:
    """Median and spread of the per-round ratios ``other / base`` (>1: base is faster).

    Returns:
        ``median``, ``min``, ``max`` and the interquartile ``q1``/``q3`` of the ratios.
    """
    ratios = sorted(o / b for b, o in zip(base, other))
    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "median": statistics.median(ratios),
        "q1": quart[0],
        "q3": quart[2],
        "min": ratios[0],
        "max": ratios[-1],
    }


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes per second)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@dataclass
class Row:
    """One line of a benchmark table."""

    name: str
    compiled_ms: float
    reference_ms: float
    nbytes: int
    copy_gbs: float

    @property
    def floor_ms(self) -> float:
        return self.nbytes / (self.copy_gbs * 1e9) * 1e3

    def as_dict(self) -> dict[str, float | str]:
        return {
            "op": self.name,
            "compiled_ms": round(self.compiled_ms, 4),
            "reference_ms": round(self.reference_ms, 4),
            "speedup": round(self.reference_ms / self.compiled_ms, 2),
            "bytes": self.nbytes,
            "achieved_gbs": round(self.nbytes / (self.compiled_ms * 1e-3) / 1e9, 1),
            "floor_ms": round(self.floor_ms, 4),
            "pct_of_floor": round(100 * self.floor_ms / self.compiled_ms, 1),
        }


def print_table(rows: list[Row]) -> None:
    """Prints the rows as an aligned text table."""
    header = (
        f"{'op':<28}{'compiled ms':>12}{'reference ms':>14}{'speedup':>9}{'GB/s':>9}"
        f"{'floor ms':>10}{'%floor':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        d = row.as_dict()
        print(
            f"{d['op']:<28}{d['compiled_ms']:>12.3f}{d['reference_ms']:>14.3f}{d['speedup']:>9.2f}"
            f"{d['achieved_gbs']:>9.0f}{d['floor_ms']:>10.3f}{d['pct_of_floor']:>8.1f}"
        )

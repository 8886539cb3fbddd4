"""Fixed blocks of work with their own seeds, so a resumed run repeats the uninterrupted one.

Work items (Magpie attempts, input texts) are numbered 0, 1, ... and generated in blocks of
``batch_size`` with a seed derived from (``seed``, block, phase). A restart regenerates the block
holding the first missing item from scratch and writes only items after the last one on disk, so
its output equals a run that was never interrupted (given deterministic generation).
"""

from __future__ import annotations


def block_seed(seed: int, block: int, phase: int = 0) -> int:
    """Seed of one generation call: distinct per (seed, block, phase), stable across runs."""
    return (seed * 1_000_003 + block * 8 + phase) % (2**62)


def first_block(last_id: int | None, batch_size: int) -> int:
    """Block to resume in: the one holding item ``last_id + 1`` (0 on a fresh start)."""
    return 0 if last_id is None else (last_id + 1) // batch_size

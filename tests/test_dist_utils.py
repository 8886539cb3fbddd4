"""The distributed test harness itself: a failing rank ends the run at once, with its traceback."""

import time

import pytest
import torch.distributed as dist
from dist_utils import run_distributed


def _rank1_fails_rank0_waits(rank, world_size):
    if rank == 1:
        raise ValueError("rank one broke")
    dist.barrier()  # never completes: rank 1 is gone


@pytest.mark.slow
def test_failing_rank_is_reported_without_waiting_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 failed(.|\n)*rank one broke"):
        run_distributed(_rank1_fails_rank0_waits, 2, timeout=120)
    assert time.monotonic() - start < 60  # the grace period (10 s) plus start-up, not the timeout

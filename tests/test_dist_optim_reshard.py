"""Resuming a distributed-optimizer checkpoint on another data-parallel size, and a plain one with
the distributed optimizer switched on (real gloo ranks).

One process writes a checkpoint, two data-parallel ranks resume it (each cuts its new shard out of
the single file) and write one, and one process resumes that (assembling both ranks' files). The
losses and grad norms are those of the uninterrupted one-process run.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed
from test_grad_buffer import TINY, ZERO1

from megatron_lite.config import load_config
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training


def _train(world_size: int, *overrides: str, zero1: bool = True) -> list[tuple[float, float]]:
    cfg = load_config(None, [*TINY, *(ZERO1 if zero1 else []), *overrides])
    check_run_config(cfg, world_size)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    out = [(r.loss, r.grad_norm) for r in trainer.train()]
    trainer.runtime.dims.destroy_groups()
    return out


def _two_ranks(rank: int, world_size: int, ckpt: str, out: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    steps = _train(
        world_size, "--training.load", ckpt, "--training.save", ckpt, "--training.exit_interval", "3"
    )
    torch.save(steps, f"{out}.rank{rank}")


@pytest.mark.slow
def test_dp1_to_dp2_to_dp1(tmp_path):
    expected = _train(1)  # 4 iterations
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "steps")
    first = _train(1, "--training.save", ckpt, "--training.exit_interval", "1")
    run_distributed(_two_ranks, 2, ckpt, out)  # iterations 2-3 on dp=2, checkpoint at 3
    middle = torch.load(f"{out}.rank1")
    assert len(list((tmp_path / "ckpt/iter_0000003/mp_rank_00").glob("distrib_optim_dp*.pt"))) == 2
    last = _train(1, "--training.load", ckpt)  # iteration 4 on dp=1 again
    got = first + middle + last
    assert len(got) == len(expected) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(got, expected):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)


@pytest.mark.slow
def test_plain_checkpoint_resumes_with_zero1_on_two_ranks(tmp_path):
    """Each rank cuts its pieces of the plain optimizer's full states out of the one file."""
    expected = _train(1, zero1=False)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "steps")
    first = _train(1, "--training.save", ckpt, "--training.exit_interval", "1", zero1=False)
    run_distributed(_two_ranks, 2, ckpt, out)  # iterations 2-3 with ZeRO-1 on dp=2
    got = first + torch.load(f"{out}.rank0")
    for (loss, norm), (ref_loss, ref_norm) in zip(got, expected[:3], strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)

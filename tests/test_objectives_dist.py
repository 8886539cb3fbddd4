"""DPO under tensor, pipeline and data parallelism equals one process (gloo, real processes).

Compared: per-iteration loss, gradient norm and reward metrics, then the validation DPO loss.

Each layout scores the pairs itself (the reference pass runs under that layout: vocab-parallel
log-probs under tp, the last stage under pp, a dp split of the pairs) and must write the single
process's sidecar, then train to the same losses, gradient norms and reward metrics.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch.distributed as dist
from dist_utils import run_distributed
from objectives_common import dpo_args, preprocess_pairs

from megatron_lite.config import load_config
from megatron_lite.data.preference import ref_logps_path
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

LAYOUTS = {
    "tp2": ["--parallel.tensor", "2"],
    "pp2": ["--parallel.pipeline", "2"],
    "dp2": [],
    "dp2_zero1_overlap": [
        *("--parallel.distributed_optimizer", "true", "--parallel.overlap_grad_reduce", "true"),
        *("--parallel.overlap_param_gather", "true"),
    ],
}


def _run(args: list[str], world_size: int):
    cfg = load_config(None, args)
    check_run_config(cfg, world_size)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    out = [(r.loss, r.grad_norm, r.objective_metrics) for r in trainer.train()]
    out.append((trainer.evaluate(), 0.0, {}))  # the validation pairs' DPO loss
    if trainer.runtime.distributed:
        trainer.runtime.dims.destroy_groups()
    return out


def _body(rank: int, world_size: int, args: list[str], expected, ref_logps):
    os.environ["WORLD_SIZE"] = str(world_size)
    prefix = args[args.index("--data.path") + 1]
    for name, layout in LAYOUTS.items():
        if rank == 0:
            os.remove(ref_logps_path(prefix))  # this layout's own reference pass writes it again
        dist.barrier()
        got = _run([*args, *layout], world_size)
        np.testing.assert_allclose(np.load(ref_logps_path(prefix))["logps"], ref_logps, rtol=1e-5)
        for (loss, norm, metrics), (ref_loss, ref_norm, ref_metrics) in zip(got, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (name, rank, got, expected)
            assert norm == pytest.approx(ref_norm, rel=1e-5), (name, rank, got, expected)
            # rewards are beta * (pi - ref), differences of sums of ~10 log-probs (~ -50): an fp32
            # reduction in another order moves them by ~1e-5 absolute
            assert metrics == pytest.approx(ref_metrics, abs=1e-4), (name, rank, got, expected)
        dist.barrier()  # every rank has read the sidecar before rank 0 removes it


@pytest.mark.slow
def test_dpo_parallel_layouts_match_one_process(tmp_path):
    prefix, tok = preprocess_pairs(tmp_path, n=16)
    args = dpo_args(prefix, tok)
    expected = _run(args, 1)
    # pi == ref at step 0 (log 2); later steps move away: the comparison is not between constants
    assert expected[0][0] == pytest.approx(math.log(2)) and abs(expected[-1][0] - math.log(2)) > 1e-3
    ref_logps = np.load(ref_logps_path(prefix))["logps"]
    run_distributed(_body, 2, args, expected, ref_logps)

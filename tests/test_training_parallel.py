"""The trainer on 2 gloo processes reproduces the one-process run: DP, TP (+SP, replicated KV), EP;
and sharded checkpoints resume each of them exactly.

Both runs start from the same full weights (the one-process model's, sliced by
``load_full_state_dict``), so per-iteration losses and gradient norms must agree; the grad norm
checks that no shard is counted twice or missed.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed
from tiny import TINY_MODEL

from megatron_lite.config import load_config
from megatron_lite.parallel.parallelize import load_full_state_dict
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

TINY = [
    *TINY_MODEL,
    "--data.mock",
    "true",
    "--data.seq_length",
    "32",
    "--training.micro_batch_size",
    "2",
    "--training.global_batch_size",
    "8",
    "--training.train_iters",
    "5",
    "--optimizer.lr",
    "3e-3",
    "--optimizer.lr_warmup_iters",
    "1",
    "--optimizer.clip_grad",
    "0.5",
    "--logging.log_interval",
    "1000",
]

# case -> (overrides of the 1-rank reference, overrides of the 2-rank run). MoE routing statistics
# are summed over the DP ranks' j-th microbatches, so the MoE reference uses micro-batch mbs * dp.
KV1 = ["--model.num_kv_heads", "1"]
MOE = ["--model.arch", "mixtral", "--model.num_experts", "4"]
CASES = {
    "dp2": ([], []),
    "tp2_sp_kv1_selective_recompute": (
        KV1,
        [
            *KV1,
            "--parallel.tensor",
            "2",
            "--parallel.sequence_parallel",
            "true",
            "--training.recompute",
            "selective",
        ],
    ),
    "ep2_moe": ([*MOE, "--training.micro_batch_size", "4"], [*MOE, "--parallel.expert", "2"]),
}


def _trainer(overrides: list[str], world_size: int):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, world_size)
    return setup_training(cfg, init_runtime(cfg), log=lambda _: None)


def _run(overrides: list[str], world_size: int, weights: str | None = None) -> list[tuple[float, float]]:
    trainer = _trainer(overrides, world_size)
    if weights is not None:
        load_full_state_dict(trainer.model, torch.load(weights, weights_only=True), trainer.runtime.dims)
    out = [(r.loss, r.grad_norm) for r in trainer.train()]
    trainer.runtime.dims.destroy_groups()
    return out


def _body(rank: int, world_size: int, cases: dict[str, tuple[list[str], str, list[tuple[float, float]]]]):
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun would set; the process group exists already
    for case, (overrides, weights, expected) in cases.items():
        got = _run(overrides, world_size, weights)
        for (loss, norm), (ref_loss, ref_norm) in zip(got, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=2e-5), (case, rank, got, expected)
            assert norm == pytest.approx(ref_norm, rel=2e-5), (case, rank, got, expected)
        # Sharded checkpoints (one file per tp/ep shard) resume to the same losses, bit for bit.
        ckpt = f"{weights}.ckpt"
        first_part = [*overrides, "--training.save", ckpt, "--training.exit_interval", "1"]
        resumed = _run(first_part, world_size, weights)
        resumed += _run([*overrides, "--training.load", ckpt], world_size)
        assert resumed == got, (case, rank, resumed, got)


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    """One pair of processes runs every case (spawning costs more than the runs)."""
    cases = {}
    for case, (single, parallel) in CASES.items():
        reference = _trainer(single, 1)
        weights = tmp_path / f"{case}.pt"
        torch.save({k: v.clone() for k, v in reference.model.state_dict().items()}, weights)
        cases[case] = (parallel, str(weights), [(r.loss, r.grad_norm) for r in reference.train()])
    run_distributed(_body, 2, cases)

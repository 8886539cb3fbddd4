"""Gradient buffers with overlapped bucketed reduction and the distributed optimizer (ZeRO-1).

Four gloo ranks run dp=4, tp=2 (+SP, replicated KV) x dp=2, Mixtral with ep=2 (edp=2 != dp=4) and
a breadth-first pipeline (pp=2, vpp=2, tied embedding, recompute) x dp=2, each with
``parallel.overlap_grad_reduce`` and ``parallel.distributed_optimizer`` on and small buckets.
Per-iteration losses and gradient norms, and the parameters after the run, must equal the
one-process run's; the hooks must have launched buckets before the backward ended; and a
distributed-optimizer checkpoint (one AdamW shard per dp rank) must resume bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed
from tiny import TINY_MODEL

from megatron_lite.config import load_config
from megatron_lite.parallel.sharding import shard_tensor
from megatron_lite.training import checkpoint
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

TINY = [
    *TINY_MODEL,
    *("--data.mock", "true", "--data.seq_length", "32", "--logging.log_interval", "1000"),
    *("--training.micro_batch_size", "2", "--training.global_batch_size", "16"),
    *("--training.train_iters", "5"),
    *("--optimizer.lr", "3e-3", "--optimizer.lr_warmup_iters", "1", "--optimizer.clip_grad", "0.5"),
]
# 0.05 MiB = 13107 fp32 elements: the tiny model's gradients fill several buckets per buffer.
ZERO1 = ["--parallel.distributed_optimizer", "true", "--parallel.overlap_grad_reduce", "true"]
ZERO1 += ["--parallel.grad_bucket_mb", "0.05"]
KV1 = ["--model.num_kv_heads", "1"]
MOE = ["--model.arch", "mixtral", "--model.num_experts", "4"]
PIPE = ["--model.num_layers", "4", "--model.tie_embeddings", "true"]
OVERLAP_ONLY = ["--parallel.overlap_grad_reduce", "true", "--parallel.grad_bucket_mb", "0.05"]
ZERO1_NO_OVERLAP = ["--parallel.distributed_optimizer", "true", "--parallel.grad_bucket_mb", "0.05"]
FP16 = ["--training.precision", "fp16"]
# case -> (overrides of the 1-rank reference, overrides of the 4-rank run). MoE routing statistics
# are summed over the DP ranks' j-th microbatches, so the MoE reference uses micro-batch mbs * dp.
CASES = {
    "dp4": ([], ZERO1),
    "dp4_fp16": (FP16, [*FP16, *ZERO1]),  # starts at a loss scale that overflows: skipped steps
    "dp4_overlap_allreduce": ([], OVERLAP_ONLY),
    "tp2_sp_dp2": (KV1, [*KV1, "--parallel.tensor", "2", "--parallel.sequence_parallel", "true", *ZERO1]),
    "ep2_edp2_moe": ([*MOE, "--training.micro_batch_size", "8"], [*MOE, "--parallel.expert", "2", *ZERO1]),
    "tp2_ep2_moe_no_overlap": (  # tp-partial router, etp = 2, edp = 1
        [*MOE, "--training.micro_batch_size", "4"],
        [*MOE, "--parallel.tensor", "2", "--parallel.expert", "2", *ZERO1_NO_OVERLAP],
    ),
    "pp2_dp2_breadth_first": (
        PIPE,
        [*PIPE, "--parallel.pipeline", "2", "--parallel.virtual_pipeline", "2"]
        + ["--parallel.schedule", "breadth-first", "--training.recompute", "full", *ZERO1],
    ),
}
RESUMED = ("ep2_edp2_moe", "pp2_dp2_breadth_first")
# fp16 weights and activations (the mixed-precision recipe): this scale overflows at the first
# step, and at the third (halved once, not yet grown back) on this data.
FIRST_LOSS_SCALE = {"dp4_fp16": 2.0**23}
# fp16 backward passes round differently enough that Adam's elements with a tiny second moment
# move by ~2e-5 after 5 steps whatever the reduction (the plain all-reduce path does the same).
PARAM_ATOL = {"dp4_fp16": 1e-4}


def _trainer(overrides: list[str], world_size: int, loss_scale: float | None = None):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, world_size)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    if loss_scale is not None:
        trainer.scaler.scale = loss_scale
    return trainer


def _run(overrides: list[str], world_size: int, loss_scale: float | None = None):
    """Train; -> (per-iteration (loss, grad norm), the trainer, bucket stats of every step)."""
    trainer = _trainer(overrides, world_size, loss_scale)
    stats, step = [], trainer.train_step

    def recording_step(microbatches):
        result = step(microbatches)
        stats.append(trainer.grad_sync.stats() if trainer.grad_sync else None)
        return result

    trainer.train_step = recording_step
    results = trainer.train()
    trainer.runtime.dims.destroy_groups()
    return [(r.loss, r.grad_norm) for r in results], trainer, stats


def _check_params(case: str, model, expected_file: str, dims) -> None:
    """Every local parameter equals its shard of the one-process run's final weights."""
    full = torch.load(expected_file, weights_only=True)
    atol = PARAM_ATOL.get(case, 1e-6)
    for name, param in model.named_parameters():
        want = shard_tensor(full[name], name, model.cfg, dims.local)
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=atol, msg=f"{case} {name}")


def _resume(case: str, overrides: list[str], got, world_size: int, root: str) -> None:
    ckpt = os.path.join(root, case)
    first, trainer, _ = _run(
        [*overrides, "--training.save", ckpt, "--training.exit_interval", "2"], world_size
    )
    dims = trainer.runtime.dims
    shard_dir = checkpoint.iteration_dir(ckpt, 2) / checkpoint.shard_name(dims, dims.rank)
    assert (shard_dir / f"distrib_optim_dp{dims.local.dp:03d}.pt").is_file(), sorted(os.listdir(shard_dir))
    rest, _, _ = _run([*overrides, "--training.load", ckpt], world_size)
    assert first + rest == got, (case, first, rest, got)


def _body(rank: int, world_size: int, cases: dict, root: str):
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun would set; the process group exists already
    for case, (overrides, expected, final_weights) in cases.items():
        got, trainer, stats = _run(overrides, world_size, FIRST_LOSS_SCALE.get(case))
        for (loss, norm), (ref_loss, ref_norm) in zip(got, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (case, rank, got, expected)
            assert norm == pytest.approx(ref_norm, rel=1e-5, nan_ok=True), (case, rank, got, expected)
        _check_params(case, trainer.model, final_weights, trainer.runtime.dims)
        # Overlap: several buckets, and the hooks launched at least two of them while gradients of
        # later buckets were still being computed; without overlap, finish_grad_sync launches all.
        overlap = "--parallel.overlap_grad_reduce" in overrides
        for step in stats:
            assert step["buckets"] >= 3, (case, rank, stats)
            early = step["launched_early"]
            assert early >= 2 if overlap else step["launched_in_backward"] == 0, (case, rank, stats)
        if case in RESUMED:
            _resume(case, overrides, got, world_size, root)


@pytest.mark.slow
def test_zero1_with_overlap_matches_one_process(tmp_path):
    """One set of 4 processes runs every case (spawning costs more than the runs)."""
    cases = {}
    for case, (single, parallel) in CASES.items():
        reference = _trainer(single, 1, FIRST_LOSS_SCALE.get(case))
        expected = [(r.loss, r.grad_norm) for r in reference.train()]
        if case in FIRST_LOSS_SCALE:
            assert [r.skipped for r in reference.history] == [True, False, True, False, False]
        weights = tmp_path / f"{case}.pt"
        torch.save({k: v.clone() for k, v in reference.model.state_dict().items()}, weights)
        cases[case] = (parallel, expected, str(weights))
    run_distributed(_body, 4, cases, str(tmp_path))

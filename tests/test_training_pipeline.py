"""Pipelined training reproduces the unpipelined run: the trainer on gloo ranks, and pretrain (torchrun).

Both runs start from ``training.seed`` (weights are initialised by canonical name, so a pipeline
stage starts from the same values as the whole model, the tied embedding's two copies included);
per-iteration losses and gradient norms must agree (the norm checks that every stage counts once
and the tied embedding is not counted twice), evaluation must agree, and a pipelined checkpoint
(``mp_rank_XX_YYY`` shards) must resume to the same losses.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from dist_utils import run_distributed
from test_training_cli import pretrain
from test_training_logging import TRAIN_RE
from tiny import TINY_MODEL

from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

TINY = [
    *TINY_MODEL,
    *("--model.num_layers", "4", "--data.mock", "true", "--data.seq_length", "32"),  # 4 layers: 2 per stage
    *("--training.micro_batch_size", "2", "--training.global_batch_size", "8"),
    *("--training.train_iters", "5", "--training.eval_iters", "1", "--data.split", "90,10,0"),
    *("--optimizer.lr", "3e-3", "--optimizer.lr_warmup_iters", "1", "--optimizer.clip_grad", "0.5"),
    *("--logging.log_interval", "1000"),
]
MOE = ["--model.arch", "mixtral", "--model.num_experts", "4"]
PP2 = ["--parallel.pipeline", "2"]
RECOMPUTE = ["--training.recompute", "full"]  # same values, forwards replayed inside the chunks' backward
# case -> (overrides of both runs, what the 2-rank run adds)
CASES = {
    "1f1b_tied": (["--model.tie_embeddings", "true"], [*PP2, "--parallel.schedule", "1f1b"]),
    "breadth_first_v2_moe": (
        MOE,
        [*PP2, "--parallel.virtual_pipeline", "2", "--parallel.schedule", "breadth-first", *RECOMPUTE],
    ),
}


def _trainer(overrides: list[str], world_size: int):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, world_size)
    return setup_training(cfg, init_runtime(cfg), log=lambda _: None)


def _run(overrides: list[str], world_size: int) -> tuple[list[tuple[float, float]], float]:
    trainer = _trainer(overrides, world_size)
    assert trainer.valid_stream is not None
    out = [(r.loss, r.grad_norm) for r in trainer.train()]
    valid = trainer.evaluate()
    trainer.runtime.dims.destroy_groups()
    return out, valid


def _body(rank: int, world_size: int, cases: dict, ckpt_root: str):
    os.environ["WORLD_SIZE"] = str(world_size)  # what torchrun would set; the process group exists already
    for case, (overrides, (expected, expected_valid)) in cases.items():
        got, valid = _run(overrides, world_size)
        for (loss, norm), (ref_loss, ref_norm) in zip(got, expected, strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5), (case, rank, got, expected)
            assert norm == pytest.approx(ref_norm, rel=1e-5), (case, rank, got, expected)
        assert valid == pytest.approx(expected_valid, rel=1e-5), (case, rank, valid, expected_valid)
    # A pipelined checkpoint (one shard per pipeline stage) resumes to the same losses, bit for bit.
    overrides, _ = cases["1f1b_tied"]
    ckpt = os.path.join(ckpt_root, "ckpt")
    first, _ = _run([*overrides, "--training.save", ckpt, "--training.exit_interval", "2"], world_size)
    if rank == 0:
        assert sorted(os.listdir(os.path.join(ckpt, "iter_0000002"))) == [
            "config.yaml",
            "metadata.json",
            "mp_rank_00_000",
            "mp_rank_00_001",
            "rng",
        ]
    rest, _ = _run([*overrides, "--training.load", ckpt], world_size)
    got, _ = _run(overrides, world_size)
    assert first + rest == got, (rank, first + rest, got)


@pytest.mark.slow
def test_pipelined_trainer_matches_one_process(tmp_path):
    cases = {}
    for case, (common, pipelined) in CASES.items():
        overrides = [*common, "--training.eval_interval", "100"]
        reference = _run(overrides, 1)
        cases[case] = ([*overrides, *pipelined], reference)
    run_distributed(_body, 2, cases, str(tmp_path))


@pytest.mark.slow
def test_torchrun_pipelined_pretrain_matches_one_process(tmp_path):
    args = ["--model.num_layers", "4", "--training.train_iters", "5", "--logging.log_interval", "1"]
    args += ["--training.eval_interval", "none"]
    (tmp_path / "single").mkdir()
    (tmp_path / "piped").mkdir()
    single = pretrain(tmp_path / "single", *args)
    assert single.returncode == 0, single.stderr[-3000:]
    pipelined = ["--parallel.pipeline", "2", "--parallel.virtual_pipeline", "2"]
    pipelined += ["--parallel.schedule", "breadth-first"]
    piped = pretrain(tmp_path / "piped", *args, *pipelined, nproc=2)
    assert piped.returncode == 0, piped.stderr[-3000:]
    losses = [
        [float(m["loss"]) for m in map(TRAIN_RE.search, out.stdout.splitlines()) if m]
        for out in (single, piped)
    ]
    assert len(losses[0]) == 5
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--model.num_layers", "5"] + PP2,
            r"model.num_layers \(5\) cannot be split over parallel.pipeline \(2\)",
        ),
        (
            [*PP2, "--parallel.virtual_pipeline", "2", "--parallel.num_layers_in_first_stage", "3"],
            r"num_layers_in_first_stage \(3\)",
        ),
        (
            ["--parallel.virtual_pipeline", "2"],
            r"parallel.virtual_pipeline \(2\) > 1 needs parallel.pipeline > 1",
        ),
        ([*PP2, "--parallel.schedule", "zigzag"], r"parallel.schedule .*'zigzag'"),
        (
            [
                *PP2,
                "--parallel.virtual_pipeline",
                "2",
                "--parallel.schedule",
                "interleaved",
                "--training.global_batch_size",
                "6",
            ],
            r"parallel.schedule 'interleaved' cannot run with .* 3 microbatch",
        ),
        (
            [*PP2, "--parallel.virtual_pipeline", "2", "--parallel.schedule", "1f1b"],
            r"parallel.schedule '1f1b' cannot run .*virtual_pipeline_parallel is 2",
        ),
    ],
)
def test_bad_pipeline_config_fails_before_any_process_group(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, [*TINY, *overrides])
        check_run_config(cfg, 2)
    assert not torch.distributed.is_initialized()


def test_pipeline_config_error_from_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the check runs before any process group
    out = pretrain(tmp_path, "--parallel.pipeline", "2", "--model.num_layers", "3")
    assert out.returncode == 2
    assert re.match(r"config error: model.num_layers \(3\) cannot be split", out.stderr), out.stderr

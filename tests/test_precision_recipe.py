"""The mixed-precision recipe (training/runtime.py): bf16 weights, fp32 main grads/params/Adam states.

One process: the dtypes of every piece of state per precision, bf16 training of Mistral and
Mixtral, exact bf16 resume (the checkpoint holds the fp32 main values), an fp32 checkpoint of the
old recipe loading into a bf16 run, and the precision config checks. Two gloo ranks (slow): the
distributed optimizer in bf16 against the one-process bf16 run, the overlapped parameter
all-gather against the synchronous one (bitwise), a bf16 gradient reduction, and a dp=2 resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from tiny import TINY_MODEL

from megatron_lite import ops
from megatron_lite.config import ConfigError, load_config
from megatron_lite.models import build_model
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.grad_buffer import GradSync
from megatron_lite.parallel.parallelize import materialize_local
from megatron_lite.training import checkpoint
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

TINY = [
    *TINY_MODEL,
    *("--data.mock", "true", "--data.seq_length", "32", "--logging.log_interval", "1000"),
    *("--training.micro_batch_size", "2", "--training.global_batch_size", "4", "--training.train_iters", "6"),
    *("--optimizer.lr", "3e-3", "--optimizer.lr_warmup_iters", "1", "--optimizer.clip_grad", "1.0"),
]
BF16 = ["--training.precision", "bf16"]
MOE = ["--model.arch", "mixtral", "--model.num_experts", "4"]
ZERO1 = ["--parallel.distributed_optimizer", "true", "--parallel.grad_bucket_mb", "0.05"]


def _trainer(*overrides: str, world_size: int = 1):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, world_size)
    return setup_training(cfg, init_runtime(cfg), log=lambda _: None)


def _fp32_init(trainer) -> dict[str, torch.Tensor]:
    """The fp32 initial values of the trainer's (unparallelized) model, recomputed from the seed."""
    model = build_model(trainer.cfg.model, "meta", dtype=torch.float32)
    materialize_local(model, trainer.runtime.dims, trainer.cfg.training.seed)
    return dict(model.named_parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("zero1", [False, True])
def test_dtypes_of_weights_grads_main_params_and_states(precision, zero1):
    trainer = _trainer(
        "--training.precision", precision, *(ZERO1 if zero1 else []), "--training.train_iters", "2"
    )
    trainer.train()
    low = precision != "fp32"
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert {p.dtype for p in trainer.model.parameters()} == {want}
    sync, opt = trainer.grad_sync, trainer.optimizer
    if not low and not zero1:
        assert sync is None  # fp32 without data-parallel flags: no buffers, plain AdamW (as before)
        return
    for name, param in trainer.model.named_parameters():
        assert param.main_grad.dtype == torch.float32, name
        assert param.grad is None if low else param.grad.data_ptr() == param.main_grad.data_ptr(), name
    assert all(buffer.data.dtype == torch.float32 for buffer in sync.buffers)
    assert all(
        buffer.param_data is None if not low else buffer.param_data.dtype == want for buffer in sync.buffers
    )
    mains = opt.main_params
    assert mains and {m.dtype for m in mains} == {torch.float32}
    if low:  # owned fp32 copies, not views of the weights
        weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
        assert not weights & {m.untyped_storage().data_ptr() for m in mains}
    inner = opt.optimizer
    for main in mains:
        state = inner.state[main]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # The bf16 weights are the fp32 main values rounded.
    if low and not zero1:
        for (name, param), main in zip(trainer.model.named_parameters(), mains):
            assert torch.equal(param, main.to(want)), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_main_params_start_from_the_exact_fp32_init(precision):
    trainer = _trainer("--training.precision", precision, "--training.train_iters", "2")
    init = _fp32_init(trainer)
    for name, main in trainer.optimizer.mains.items():
        assert torch.equal(main, init[name]), name


@pytest.mark.parametrize("arch", [[], MOE], ids=["mistral", "mixtral"])
def test_bf16_trains_and_expert_gemms_get_bf16(arch, monkeypatch):
    seen = []
    grouped_mm = ops.grouped_mm

    def recording(x, w, counts):
        seen.append((x.dtype, w.dtype))
        return grouped_mm(x, w, counts)

    monkeypatch.setattr(ops, "grouped_mm", recording)
    trainer = _trainer(*BF16, *arch, "--training.train_iters", "12")
    losses = [r.loss for r in trainer.train()]
    assert all(not r.skipped for r in trainer.history)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert set(seen) == ({(torch.bfloat16, torch.bfloat16)} if arch else set())


@pytest.mark.parametrize("zero1", [False, True], ids=["plain", "zero1"])
def test_bf16_resume_is_exact_and_checkpoint_holds_fp32_main_values(tmp_path, zero1):
    flags = [*BF16, *MOE, *(ZERO1 if zero1 else [])]
    expected = [(r.loss, r.grad_norm) for r in _trainer(*flags).train()]
    ckpt = str(tmp_path / "ckpt")
    first_trainer = _trainer(*flags, "--training.save", ckpt, "--training.exit_interval", "3")
    first = first_trainer.train()
    saved = torch.load(tmp_path / "ckpt/iter_0000003/mp_rank_00/model_optim_rng.pt", weights_only=True)
    mains = dict(first_trainer.optimizer.model_state_dict(first_trainer.model))
    for name, param in first_trainer.model.named_parameters():
        assert saved["model"][name].dtype == torch.float32, name
        assert torch.equal(saved["model"][name], mains[name]), name
        assert torch.equal(param, saved["model"][name].to(torch.bfloat16)), name
    rest = _trainer(*flags, "--training.load", ckpt).train()
    assert [(r.loss, r.grad_norm) for r in first + rest] == expected


@pytest.mark.parametrize("zero1", [False, True], ids=["plain", "zero1"])
def test_fp32_checkpoint_of_the_old_recipe_loads_into_a_bf16_run(tmp_path, zero1):
    ckpt = str(tmp_path / "ckpt")
    old = _trainer(*(ZERO1 if zero1 else []), "--training.save", ckpt, "--training.train_iters", "2")
    old.train()
    fp32 = {n: p.detach().clone() for n, p in old.model.named_parameters()}
    new = _trainer(*BF16, *(ZERO1 if zero1 else []), "--training.load", ckpt, "--training.train_iters", "2")
    assert new.iteration == 2
    mains = new.optimizer.model_state_dict(new.model)
    for name, param in new.model.named_parameters():
        assert torch.equal(mains[name], fp32[name]), name  # the fp32 values, not the bf16 rounding
        assert torch.equal(param, fp32[name].to(torch.bfloat16)), name
    moments = new.optimizer.optimizer.state_dict()["state"]
    assert moments and all(s["exp_avg"].dtype == torch.float32 for s in moments.values())


def test_initial_load_gives_the_main_params_the_exact_fp32_values(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _trainer(*BF16, "--training.save", ckpt, "--training.train_iters", "2").train()
    saved = torch.load(tmp_path / "ckpt/iter_0000002/mp_rank_00/model_optim_rng.pt", weights_only=True)
    fresh = _trainer(*BF16, "--training.initial_load", ckpt, "--training.train_iters", "2")
    assert fresh.iteration == 0
    for name, main in fresh.optimizer.mains.items():
        assert torch.equal(main, saved["model"][name]), name  # not the bf16 rounding of them


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--parallel.overlap_param_gather", "true"],
            r"parallel.overlap_param_gather needs parallel.distributed",
        ),
        (["--parallel.grad_reduce_dtype", "fp8"], r"parallel.grad_reduce_dtype \('fp8'\) must be one of"),
    ],
)
def test_bad_parallel_precision_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_bf16_gradient_reduction_needs_bf16_training(precision):
    cfg = load_config(
        None, [*TINY, "--training.precision", precision, "--parallel.grad_reduce_dtype", "bf16"]
    )
    with pytest.raises(
        ConfigError, match=r"^parallel.grad_reduce_dtype 'bf16' needs training.precision bf16"
    ):
        check_run_config(cfg, 1)
    assert not torch.distributed.is_initialized()


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    cfg = load_config(None, [*TINY, *BF16, "--training.device", "cuda"])
    with pytest.raises(ConfigError, match=r"^training.precision 'bf16' is not supported by Tesla V100"):
        check_run_config(cfg, 1)


# ---------------------------------------------------------------- two processes

# bf16 tolerance against the one-process run: the dp ranks sum their fp32 main gradients in
# another order and their bf16 forward runs on other batch shapes (mbs 2 per rank vs the same
# microbatches on one rank: identical here), so gradients differ in the last fp32 bits only; the
# weights are bf16 roundings of fp32 main values that agree to ~1e-6, so a rounding boundary can
# flip one bf16 ulp (2**-8 relative) in a few elements, which moves the next loss by far less.
LOSS_RTOL = 2e-3


def _bf16_reduction(rank: int, world_size: int) -> None:
    """``grad_reduce_dtype bf16``: the fp32 buffer receives the bf16 sum, all-reduced or scattered."""
    dims = ParallelDims.build(world_size)
    dims.create_groups()
    for shard in (False, True):
        model = torch.nn.Linear(64, 48)
        sync = GradSync(model, dims, bucket_mb=1e-9, shard=shard, reduce_dtype=torch.bfloat16)
        sync.start_step(1)
        values = [
            torch.randn(sync.buffers[0].data.shape, generator=torch.Generator().manual_seed(r))
            for r in (0, 1)
        ]
        sync.buffers[0].data.copy_(values[rank] * 1.001)  # not bf16-representable
        sync.finish_grad_sync()
        (buffer,) = sync.buffers
        want = sum(v.mul(1.001).bfloat16().float() for v in values).bfloat16().float()
        for bucket in buffer.buckets:
            lo, hi = buffer.shard_range(bucket) if shard else (bucket.start, bucket.end)
            assert torch.equal(buffer.data[lo:hi], want[lo:hi]), (shard, bucket.index)
    dims.destroy_groups()


def _dp2_body(rank: int, world_size: int, expected: list, root: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    _bf16_reduction(rank, world_size)
    sync_run = _trainer(*BF16, *MOE, *ZERO1, world_size=world_size)
    got = [(r.loss, r.grad_norm) for r in sync_run.train()]
    for (loss, norm), (ref_loss, ref_norm) in zip(got, expected, strict=True):
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), (rank, got, expected)
        assert norm == pytest.approx(ref_norm, rel=2e-2), (rank, got, expected)
    sync_run.runtime.dims.destroy_groups()
    overlap = _trainer(*BF16, *MOE, *ZERO1, "--parallel.overlap_param_gather", "true", world_size=world_size)
    assert [(r.loss, r.grad_norm) for r in overlap.train()] == got  # same collectives, waited later
    buckets = sum(len(b.buckets) for b in overlap.grad_sync.buffers)
    waited = sum(b.forward_waits for b in overlap.grad_sync.buffers)
    assert buckets >= 3 and waited == buckets * 5, (buckets, waited)  # every bucket, steps 2..6
    for p, q in zip(sync_run.model.parameters(), overlap.model.parameters()):
        assert torch.equal(p, q)
    overlap.runtime.dims.destroy_groups()
    bf16_wire = _trainer(*BF16, *MOE, *ZERO1, "--parallel.grad_reduce_dtype", "bf16", world_size=world_size)
    wire = [(r.loss, r.grad_norm) for r in bf16_wire.train()]
    assert [loss for loss, _ in wire] == pytest.approx([loss for loss, _ in got], rel=1e-2)
    bf16_wire.runtime.dims.destroy_groups()
    ckpt = os.path.join(root, "ckpt")
    flags = [*BF16, *MOE, *ZERO1, "--parallel.overlap_param_gather", "true"]
    first = _trainer(*flags, "--training.save", ckpt, "--training.exit_interval", "3", world_size=world_size)
    head = [(r.loss, r.grad_norm) for r in first.train()]
    first.runtime.dims.destroy_groups()
    rest = _trainer(*flags, "--training.load", ckpt, world_size=world_size)
    assert head + [(r.loss, r.grad_norm) for r in rest.train()] == got
    rest.runtime.dims.destroy_groups()


@pytest.mark.slow
def test_dp2_distributed_optimizer_bf16_matches_one_process_and_overlap_is_exact(tmp_path):
    # The MoE routing statistics are summed over the dp ranks' j-th microbatches: the one-process
    # reference uses micro-batch mbs * dp so it sees the same union (trainer module docstring).
    reference = _trainer(*BF16, *MOE, "--training.micro_batch_size", "4")
    expected = [(r.loss, r.grad_norm) for r in reference.train()]
    run_distributed(_dp2_body, 2, expected, str(tmp_path))
    ckpt = tmp_path / "ckpt"
    assert checkpoint.latest_iteration(ckpt) == 3
    # The dp=2 checkpoint resumes on one process: main params rebuilt from the fp32 model state.
    resumed = _trainer(*BF16, *MOE, *ZERO1, "--training.load", str(ckpt))
    saved = torch.load(ckpt / "iter_0000003/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]
    assert resumed.iteration == 3
    for name, main in resumed.optimizer.model_state_dict(resumed.model).items():
        assert main.dtype == torch.float32 and torch.equal(main, saved[name]), name
    assert all(not r.skipped for r in resumed.train())


@pytest.mark.slow
def test_bench_memory_smoke():
    script = Path(__file__).resolve().parents[1] / "benchmarks/bench_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--layouts", "dp1_zero1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    (row,) = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    weights, grads, mains, states, total, target = map(float, row[4:10])  # then ZeRO-3 working sets
    assert (weights, grads) == pytest.approx((2.0, 4.0), abs=0.01)  # bf16 weights, fp32 main grads
    assert (mains, states) == pytest.approx((4.0, 8.0), abs=0.01)  # fp32 main params, Adam moments
    assert total == pytest.approx(target, abs=0.02) and target == 18.0

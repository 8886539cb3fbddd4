"""EMA of the weights (``training.ema_decay``, training/ema.py).

The reference is a direct loop over the run's own steps: the fp32 main values after every applied
optimizer step are recorded, and ``ema = d * ema + (1 - d) * main`` is computed from them in plain
torch; the trainer's EMA, a resumed run's EMA and the Hugging Face export must equal it exactly.
Under dp 2 with the distributed optimizer (real gloo ranks) every rank holds only its pieces, and
the gathered EMA equals the one-process run's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from tiny import TINY_MODEL

from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.convert_stream import CheckpointSource, HFSource
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

DECAY = "0.75"  # far from 1, so four steps move the average well away from its start
TINY = [
    *TINY_MODEL,
    *("--data.mock", "true", "--data.seq_length", "16", "--logging.log_interval", "1000"),
    *("--training.micro_batch_size", "2", "--training.global_batch_size", "4", "--training.train_iters", "4"),
    *("--optimizer.lr", "3e-3", "--optimizer.lr_warmup_iters", "0", "--optimizer.clip_grad", "0.5"),
    *("--training.ema_decay", DECAY),
]
ZERO1 = ["--parallel.distributed_optimizer", "true", "--parallel.grad_bucket_mb", "0.02"]


def _convert_tool():
    path = Path(__file__).resolve().parents[1] / "tools/convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(*overrides: str, world_size: int = 1):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, world_size)
    return setup_training(cfg, init_runtime(cfg), log=lambda _: None)


def _main_values(trainer) -> dict[str, torch.Tensor]:
    """The fp32 values the optimizer steps, by name (whole local parameters; gathers under ZeRO-1)."""
    opt = trainer.optimizer
    if hasattr(opt, "model_state_dict") and (not hasattr(opt, "mixed") or opt.mixed):
        state = opt.model_state_dict(trainer.model)
    else:
        state = trainer.model.state_dict()
    return {n: t.detach().float().clone() for n, t in state.items()}


def _run_recording(trainer) -> list[dict[str, torch.Tensor]]:
    """Train; -> main values at the start and after every applied (not skipped) step."""
    seen, step = [_main_values(trainer)], trainer.train_step

    def recording(microbatches):
        result = step(microbatches)
        if not result.skipped:
            seen.append(_main_values(trainer))
        return result

    trainer.train_step = recording
    trainer.train()
    return seen


def _direct_ema(seen: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    ema = {n: t.clone() for n, t in seen[0].items()}
    for values in seen[1:]:
        for name, t in ema.items():
            t.mul_(decay).add_(values[name], alpha=1.0 - decay)
    return ema


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        assert got[name].dtype == torch.float32, (what, name, got[name].dtype)
        assert torch.equal(got[name], want[name]), (what, name, (got[name] - want[name]).abs().max())


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", "fast"])
def test_bad_decay_is_refused(value):
    with pytest.raises(ConfigError, match=r"^training.ema_decay \(.*\) must be a number"):
        load_config(None, ["--data.mock", "true", "--training.ema_decay", value]).validate()


def test_zero_decay_keeps_no_ema():
    assert _trainer("--training.ema_decay", "0", "--training.train_iters", "2").ema is None


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_zero1"])
def test_ema_equals_direct_loop_and_resumes_bit_for_bit(tmp_path, precision):
    """bf16: the average follows the fp32 main copies (the bf16 weights would round it); bf16_zero1:
    the distributed optimizer's own fp32 shard pieces (one process)."""
    prec = ("--training.precision", precision.split("_")[0], *(ZERO1 if "zero1" in precision else ()))
    seen = _run_recording(uninterrupted := _trainer(*prec))
    want = _direct_ema(seen, float(DECAY))
    got = uninterrupted.ema.state_dict(uninterrupted.model)
    _assert_equal(got, want, f"{precision} uninterrupted")
    if precision != "fp32":  # the bf16 weights are not what is averaged: they differ from the mains
        named = dict(uninterrupted.model.named_parameters())
        assert all(p.dtype == torch.bfloat16 for p in named.values())
        assert any(not torch.equal(p.float(), seen[-1][n]) for n, p in named.items())

    ckpt = str(tmp_path / "ckpt")
    _trainer(*prec, "--training.save", ckpt, "--training.exit_interval", "2").train()
    resumed = _trainer(*prec, "--training.load", ckpt)
    _assert_equal(resumed.ema.state_dict(resumed.model), _direct_ema(seen[:3], float(DECAY)), "loaded")
    resumed.train()
    _assert_equal(resumed.ema.state_dict(resumed.model), want, f"{precision} resumed")


def test_skipped_fp16_steps_leave_the_ema(tmp_path):
    """A loss scale that overflows at iteration 3: the skipped step moves neither weights nor EMA."""
    trainer = _trainer("--training.precision", "fp16")
    scales = {0: 2.0**16, 2: 2.0**24, 3: 2.0**16}  # before iteration i + 1; 2**24 overflows here
    step = trainer.train_step

    def overflow_at_3(microbatches):
        trainer.scaler.scale = scales.get(len(trainer.history), trainer.scaler.scale)
        return step(microbatches)

    trainer.train_step = overflow_at_3
    seen = _run_recording(trainer)
    assert [r.skipped for r in trainer.history] == [False, False, True, False]
    assert len(seen) == 4
    for before, after in zip(seen, seen[1:]):  # every applied step moved the weights
        assert any(not torch.equal(before[n], after[n]) for n in before)
    _assert_equal(trainer.ema.state_dict(trainer.model), _direct_ema(seen, float(DECAY)), "fp16")


def test_export_ema_to_hf_and_refuse_without_ema(tmp_path, capsys):
    convert = _convert_tool().main
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf_ema")
    trainer = _trainer("--training.precision", "bf16", "--training.save", ckpt)
    want = _direct_ema(_run_recording(trainer), float(DECAY))
    assert convert(["--input", ckpt, "--output", hf, "--to", "hf", "--weights", "ema"]) == 0
    source = HFSource(hf)
    assert source.dtype() == torch.float32  # the EMA's own dtype
    _assert_equal({name: source.get(name) for name in want}, want, "HF export")
    model_hf = str(tmp_path / "hf_model")  # the default stays the weights
    assert convert(["--input", ckpt, "--output", model_hf, "--to", "hf", "--dtype", "fp32"]) == 0
    name = next(iter(want))
    assert torch.equal(HFSource(model_hf).get(name), trainer.optimizer.mains[name].detach())

    tp2 = str(tmp_path / "tp2")  # --with-optimizer reshards the EMA along with the moments
    args = ["--to", "megatron_lite", "--tensor", "2", "--with-optimizer"]
    assert convert(["--input", ckpt, "--output", tp2, *args]) == 0
    resharded = CheckpointSource(tp2, weights="ema")
    assert resharded.dims.tp == 2
    _assert_equal({name: resharded.get(name) for name in want}, want, "tp2 reshard")

    plain = str(tmp_path / "plain")
    _trainer("--training.ema_decay", "0", "--training.save", plain, "--training.train_iters", "2").train()
    capsys.readouterr()
    assert convert(["--input", plain, "--output", str(tmp_path / "x"), "--to", "hf", "--weights", "ema"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no EMA weights" in err[0] and "model_optim_rng.pt" in err[0], err


def _ema_exact_across_resume(flags: list[str], world_size: int, ckpt: str, what: str, on_first=None):
    """Train 2 iterations and save, resume for 2 more: the EMA equals the direct loop at both ends.

    ``on_first(trainer)`` may check the first trainer before its groups go. Returns the final EMA
    and main values (all ranks call: they gather over dp).
    """
    save = ["--training.save", ckpt, "--training.exit_interval", "2"]
    trainer = _trainer(*flags, *save, world_size=world_size)
    seen = _run_recording(trainer)  # iterations 1-2; the main values are gathered over dp
    if on_first is not None:
        on_first(trainer)
    gathered = trainer.ema.state_dict(trainer.model)
    _assert_equal(gathered, _direct_ema(seen, float(DECAY)), what)
    trainer.runtime.dims.destroy_groups()
    resumed = _trainer(*flags, "--training.load", ckpt, world_size=world_size)  # iterations 3-4
    seen_after = _run_recording(resumed)
    final = resumed.ema.state_dict(resumed.model)
    _assert_equal(final, _direct_ema([gathered, *seen_after[1:]], float(DECAY)), f"{what} resumed")
    weights = _main_values(resumed)
    resumed.runtime.dims.destroy_groups()
    return final, weights


def _dp2_body(rank: int, world_size: int, root: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)

    def half_the_ema(trainer):
        pieces = trainer.optimizer.pieces
        local = sum(v.numel() for v in trainer.ema.values)
        assert local == sum(p.hi - p.lo for p in pieces) < sum(p.numel() for p in trainer.model.parameters())

    ckpt = os.path.join(root, "ckpt")
    final, weights = _ema_exact_across_resume(ZERO1, 2, ckpt, f"dp2 rank {rank}", on_first=half_the_ema)
    if rank == 0:
        torch.save({"ema": final, "weights": weights}, os.path.join(root, "dp2_final.pt"))


@pytest.mark.slow
def test_dp2_zero1_ema_equals_one_process_and_reshards(tmp_path):
    """dp 2 ZeRO-1 (each rank half the EMA) matches one process; its checkpoint resumes on dp 1."""
    reference = _trainer()
    reference.train()
    want = reference.ema.state_dict(reference.model)
    run_distributed(_dp2_body, 2, str(tmp_path))
    got = torch.load(tmp_path / "dp2_final.pt", weights_only=True)
    # Two ranks sum the gradients in another order; Adam's full-lr first step turns that rounding of
    # near-zero gradients into weight differences of up to ~4e-6 here (the weights themselves,
    # checked below). The EMA, a convex combination of the weights, is held to the same bound.
    weights = _main_values(reference)
    for name in want:
        torch.testing.assert_close(got["weights"][name], weights[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got["ema"][name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    one = _trainer(*ZERO1, "--training.load", str(tmp_path / "ckpt"))  # dp 2 -> dp 1 at iteration 2
    stored = torch.load(tmp_path / "ckpt/iter_0000002/mp_rank_00/model_optim_rng.pt", weights_only=True)
    _assert_equal(one.ema.state_dict(one.model), stored["ema"], "dp2 -> dp1")
    one.train()
    for name, t in one.ema.state_dict(one.model).items():
        torch.testing.assert_close(t, want[name], rtol=1e-5, atol=1e-5, msg=name)


def _zero3_body(rank: int, world_size: int, root: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    zero3 = [*ZERO1, "--parallel.data_parallel_sharding", "parameters", "--parallel.pipeline", "2"]
    zero3 += ["--training.precision", "bf16"]
    _ema_exact_across_resume(zero3, 4, os.path.join(root, "ckpt"), f"zero3 rank {rank}")


@pytest.mark.slow
def test_zero3_bf16_pp2_dp2_ema_is_the_average_and_resumes(tmp_path):
    """Under ZeRO-3 (bf16 weights sharded over dp, gathered per chunk) with pp 2 x dp 2 the EMA is
    exactly the average of the fp32 main values the optimizer stepped, and resumes exactly."""
    run_distributed(_zero3_body, 4, str(tmp_path))

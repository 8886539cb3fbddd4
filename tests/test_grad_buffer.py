"""Gradient buffers and the distributed optimizer on one process: layout, hooks, config, checkpoints.

The multi-process equivalence runs are in ``test_training_dist_optim.py``.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_MODEL
from torch import nn

from megatron_lite.config import ConfigError, load_config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.grad_buffer import SHARD_ALIGN, GradSync
from megatron_lite.training import checkpoint
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training

TINY = [
    *TINY_MODEL,
    *("--data.mock", "true", "--data.seq_length", "32", "--logging.log_interval", "1000"),
    *("--training.micro_batch_size", "2", "--training.global_batch_size", "8", "--training.train_iters", "4"),
    *("--optimizer.lr", "3e-3", "--optimizer.lr_warmup_iters", "1", "--optimizer.clip_grad", "0.5"),
]
ZERO1 = ["--parallel.distributed_optimizer", "true", "--parallel.overlap_grad_reduce", "true"]
ZERO1 += ["--parallel.grad_bucket_mb", "0.05"]


def _trainer(*overrides: str):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, 1)
    return setup_training(cfg, init_runtime(cfg), log=lambda _: None)


def _one_rank() -> ParallelDims:
    dims = ParallelDims.build(1)
    dims.create_groups()  # a world of one: no process group
    return dims


class _Toy(nn.Module):
    """Three linears used in order a -> b -> c; ``skip`` leaves b out of the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, skip=False):
        h = self.a(x)
        return self.c(h if skip else self.b(h))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--parallel.grad_bucket_mb", "0"], r"parallel.grad_bucket_mb \(0.0\) must be a positive number"),
        (["--parallel.grad_bucket_mb", "-4"], r"parallel.grad_bucket_mb \(-4.0\) must be a positive number"),
        (["--parallel.distributed_optimizer", "maybe"], r"parallel.distributed_optimizer \('maybe'\)"),
        (["--parallel.overlap_grad_reduce", "2"], r"parallel.overlap_grad_reduce \('2'\)"),
    ],
)
def test_bad_config_fails_before_anything_runs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])
    assert not torch.distributed.is_initialized()


def test_layout_reverse_order_padding_and_own_bucket():
    torch.manual_seed(0)
    model = _Toy()
    # A bucket closes once it holds 16 elements; "b.weight" gets one of its own.
    sync = GradSync(model, _one_rank(), bucket_mb=16 * 4 / 2**20, own_bucket={"b.weight"})
    (buffer,) = sync.buffers
    names = [b.names for b in buffer.buckets]
    assert names == [["c.bias", "c.weight"], ["b.bias"], ["b.weight"], ["a.bias", "a.weight"]]
    for bucket in buffer.buckets:
        assert (bucket.end - bucket.start) % SHARD_ALIGN == 0
        for param, (start, end) in zip(bucket.params, bucket.ranges):
            assert param.grad.data_ptr() == buffer.data[start:end].data_ptr()  # a view, no copy
            assert bucket.start <= start < end <= bucket.end


def test_hooks_launch_in_order_and_missing_grads_count_as_zero():
    torch.manual_seed(0)
    model, x = _Toy(), torch.randn(3, 4)
    sync = GradSync(model, _one_rank(), bucket_mb=1e-9, overlap=True)  # one bucket per parameter
    (buffer,) = sync.buffers
    sync.start_step(num_microbatches=2)
    model(x).sum().backward()
    assert sync.stats()["launched_in_backward"] == 0  # the first of two microbatches: accumulate only
    model(x, skip=True).sum().backward()  # b gets no gradient in the last microbatch
    launched = [(b.names[0], b.in_backward) for b in buffer.buckets]
    # c's buckets are final and launch; b's never are, so nothing after them launches either.
    assert launched == [("c.bias", True), ("c.weight", True)] + [(n, False) for n, _ in launched[2:]]
    sync.finish_grad_sync()
    assert all(b.launched for b in buffer.buckets)
    reference = _Toy()
    reference.load_state_dict(model.state_dict())
    (reference(x).sum() + reference(x, skip=True).sum()).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_one_process_zero1_equals_plain_and_resumes(tmp_path):
    plain = _trainer()
    expected = [(r.loss, r.grad_norm) for r in plain.train()]
    zero1 = _trainer(*ZERO1)
    assert [(r.loss, r.grad_norm) for r in zero1.train()] == expected
    for p, q in zip(plain.model.parameters(), zero1.model.parameters()):
        assert torch.equal(p, q)
    # The scheduler drives the inner AdamW's groups; weight decay follows Megatron's rule.
    groups = zero1.optimizer.param_groups
    assert {g["lr"] for g in groups} == {plain.optimizer.param_groups[0]["lr"]}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    ckpt = str(tmp_path / "ckpt")
    first = _trainer(*ZERO1, "--training.save", ckpt, "--training.exit_interval", "2").train()
    assert (tmp_path / "ckpt/iter_0000002/mp_rank_00/distrib_optim_dp000.pt").is_file()
    rest = _trainer(*ZERO1, "--training.load", ckpt).train()
    assert [(r.loss, r.grad_norm) for r in first + rest] == expected


def _redigest(path) -> None:
    """Record a rewritten checkpoint file's sha256 in its ``metadata.json``."""
    import json

    meta_path = path.parents[1] / checkpoint.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["sha256"][f"{path.parent.name}/{path.name}"] = checkpoint.file_digest(path)
    meta_path.write_text(json.dumps(meta))


def test_resume_refuses_another_optimizer_reshards_another_layout_and_shards_plain(tmp_path):
    expected = [(r.loss, r.grad_norm) for r in _trainer(*ZERO1).train()]
    ckpt = str(tmp_path / "ckpt")
    first = _trainer(*ZERO1, "--training.save", ckpt, "--training.exit_interval", "1").train()
    with pytest.raises(checkpoint.CheckpointError, match="written with parallel.distributed_optimizer true"):
        _trainer("--training.load", ckpt)
    # Another bucket size: the states are cut up again from the shard file, exactly.
    rest = _trainer(*ZERO1, "--training.load", ckpt, "--parallel.grad_bucket_mb", "0.01").train()
    assert [(r.loss, r.grad_norm) for r in first + rest] == expected
    # A shard file that lacks a piece this rank needs: one line naming the parameter range.
    path = tmp_path / "ckpt/iter_0000001/mp_rank_00" / checkpoint.DISTRIB_OPTIM_FILE.format(0)
    shard = torch.load(path, weights_only=True)
    shard["pieces"], shard["piece_states"] = shard["pieces"][1:], shard["piece_states"][1:]
    torch.save(shard, path)
    _redigest(path)  # as its writer would have recorded it: the content is what is wrong here
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot reshard .* no shard file holds .*\[0:"):
        _trainer(*ZERO1, "--training.load", ckpt, "--parallel.grad_bucket_mb", "0.01")
    # A plain-optimizer checkpoint resumes with the distributed optimizer switched on.
    plain = str(tmp_path / "plain")
    first = _trainer("--training.save", plain, "--training.exit_interval", "1").train()
    rest = _trainer(*ZERO1, "--training.load", plain).train()
    assert [(r.loss, r.grad_norm) for r in first + rest] == expected


def test_bf16_parameters_accumulate_into_fp32_main_grads():
    torch.manual_seed(0)
    model, xs = _Toy(), [torch.randn(3, 4) for _ in range(2)]
    sync = GradSync(model, _one_rank(), bucket_mb=16 * 4 / 2**20)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    sync.cast_params(torch.bfloat16)
    (buffer,) = sync.buffers
    for bucket in buffer.buckets:
        for name, param, (start, end) in zip(bucket.names, bucket.params, bucket.ranges):
            assert param.dtype == torch.bfloat16 and torch.equal(param, fp32[name].bfloat16()), name
            assert param.data_ptr() == buffer.param_data[start:end].data_ptr()  # a view of the flat buffer
    sync.start_step(num_microbatches=2)
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for x in xs:
        model(x.bfloat16()).float().sum().backward()
        for name, param in model.named_parameters():
            assert param.grad is None, name  # dropped by the hook once added to main_grad
    # The reference: each microbatch's bf16 gradient, summed in fp32.
    reference = _Toy().bfloat16()
    reference.load_state_dict(model.state_dict())
    for x in xs:
        reference.zero_grad()
        reference(x.bfloat16()).float().sum().backward()
        for name, param in reference.named_parameters():
            grads[name] += param.grad.float()
    for name, param in model.named_parameters():
        assert param.main_grad.dtype == torch.float32
        assert torch.equal(param.main_grad, grads[name]), name

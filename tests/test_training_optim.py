"""LR schedule values, AdamW parameter groups, global-norm clipping, fp16 loss scaler."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import OptimizerConfig
from megatron_lite.models import build_model
from megatron_lite.training.lr_schedule import LRScheduler, build_scheduler
from megatron_lite.training.optimizer import (
    DynamicLossScaler,
    NormGroup,
    build_optimizer,
    clip_grads,
    global_grad_norm,
    param_groups,
)


def test_warmup_then_cosine():
    s = LRScheduler(None, max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, style="cosine")
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == 0.5 and s.lr_at(10) == 1.0
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert s.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == 0.1


def test_linear_and_constant():
    lin = LRScheduler(None, 1.0, 0.0, warmup_steps=0, decay_steps=100, style="linear")
    assert lin.lr_at(0) == 1.0 and lin.lr_at(25) == pytest.approx(0.75) and lin.lr_at(100) == 0.0
    const = LRScheduler(None, 2.0, 0.5, warmup_steps=4, decay_steps=4, style="constant")
    assert const.lr_at(2) == 1.0 and const.lr_at(4) == 2.0 and const.lr_at(1000) == 2.0


def test_bad_schedule():
    with pytest.raises(ValueError, match="must exceed"):
        LRScheduler(None, 1.0, 0.0, warmup_steps=10, decay_steps=10)
    with pytest.raises(ValueError, match="style"):
        LRScheduler(None, 1.0, 0.0, 0, 10, style="exp")


def test_scheduler_drives_optimizer_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=123.0)
    cfg = OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=2, lr_decay_style="linear")
    s = build_scheduler(opt, cfg, train_iters=12)
    assert opt.param_groups[0]["lr"] == 0.0
    for _ in range(3):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.9)
    fresh = build_scheduler(torch.optim.AdamW([p], lr=5.0), cfg, train_iters=12)
    fresh.load_state_dict(s.state_dict())
    assert fresh.lr == s.lr and fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.9)


def test_no_weight_decay_for_norms_and_biases():
    cfg = tiny_model_config(
        "mistral", vocab_size=64, intermediate_size=64, max_position_embeddings=32, num_experts=8
    )
    model = build_model(cfg)
    groups = param_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("norm.weight") for n in plain) and len(plain) == 2 * 2 + 1
    assert "tok_embeddings.weight" in decayed and "layers.0.attention.wqkv.weight" in decayed
    bias = torch.nn.Linear(3, 3)
    assert [len(g["params"]) for g in param_groups(bias.named_parameters(), 0.1)] == [1, 1]
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def _params_with_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (5,), (2, 2, 2))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def test_clip_matches_torch():
    ours, ref = _params_with_grads(), _params_with_grads()
    norm = clip_grads([NormGroup(ours[:1]), NormGroup(ours[1:])], max_norm=0.5, device="cpu")
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm=0.5)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    untouched = _params_with_grads()
    big = clip_grads([NormGroup(untouched)], max_norm=1e6, device="cpu")
    assert big == pytest.approx(norm) and torch.equal(untouched[0].grad, _params_with_grads()[0].grad)


def test_norm_groups_reduce_only_their_share():
    """A group's square sum goes through its all-reduce (here: a fake 'other rank holds the same')."""
    ps = _params_with_grads()
    sharded, replicated = ps[:2], ps[2:]

    def double(t):  # as if a second rank held an equal shard
        t.mul_(2)

    norm = global_grad_norm([NormGroup(sharded, double), NormGroup(replicated, None)], "cpu")
    sq = lambda group: sum(float(p.grad.pow(2).sum()) for p in group)
    assert float(norm) == pytest.approx(math.sqrt(2 * sq(sharded) + sq(replicated)), rel=1e-6)


def test_nonfinite_norm_is_reported_not_applied():
    ps = _params_with_grads()
    ps[1].grad[0] = float("inf")
    before = ps[0].grad.clone()
    assert not math.isfinite(clip_grads([NormGroup(ps)], 1.0, "cpu"))
    assert torch.equal(ps[0].grad, before)


def test_loss_scaler():
    s = DynamicLossScaler(True, initial_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([16.0])
    s.unscale_([p])
    assert float(p.grad) == 2.0
    s.update(found_inf=True)
    assert s.scale == 4.0
    s.update(False)
    s.update(False)
    assert s.scale == 8.0
    off = DynamicLossScaler(False)
    off.update(True)
    assert off.scale == 1.0
    again = DynamicLossScaler(True)
    again.load_state_dict(s.state_dict())
    assert again.scale == 8.0

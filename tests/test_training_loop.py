"""The training loop: accumulation equivalence, loss normalisation, learning on mock data, recompute, MoE."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tiny import TINY_MODEL

from megatron_lite.config import load_config
from megatron_lite.data.batching import make_batch
from megatron_lite.training.data import MockGPTDataset
from megatron_lite.training.model_setup import build_local_model
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training
from megatron_lite.training.trainer import forward_backward

VALID_RE = re.compile(r"validation loss at iteration \d+ \| lm loss value: ([\d.]+E[+-]\d+)")
TINY = [
    *TINY_MODEL,
    "--data.mock",
    "true",
    "--data.seq_length",
    "32",
    "--logging.log_interval",
    "1000",
]


def tiny_config(*overrides: str):
    cfg = load_config(None, [*TINY, *overrides])
    check_run_config(cfg, 1)
    return cfg


def uneven_batches(n: int, seq: int = 32, seed: int = 0):
    """``n`` samples whose loss masks keep very different numbers of tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 256, (n, seq + 1), generator=gen)
    mask = torch.ones(n, seq + 1)
    for i in range(n):
        mask[i, : (i * 7) % seq] = 0  # sample i trains on its last seq - 7i % seq labels
    return tokens, mask


def grads_after(model, tokens, mask, micro: int, runtime) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batches = [
        make_batch(tokens[i : i + micro], 0, False, False, False, mask[i : i + micro])
        for i in range(0, tokens.shape[0], micro)
    ]
    num_tokens = float(sum(b.loss_mask.sum() for b in batches))
    loss_sum = forward_backward(model, batches, runtime, loss_weight=1.0 / num_tokens)
    return float(loss_sum[0]) / num_tokens, [p.grad.clone() for p in model.parameters()]


def test_grad_accumulation_equals_one_big_batch():
    cfg = tiny_config("--training.micro_batch_size", "8")
    runtime = init_runtime(cfg)
    model = build_local_model(cfg, runtime)
    tokens, mask = uneven_batches(8)
    loss_big, big = grads_after(model, tokens, mask, 8, runtime)
    for micro in (1, 2, 4):
        loss_acc, acc = grads_after(model, tokens, mask, micro, runtime)
        assert loss_acc == pytest.approx(loss_big, rel=1e-6)
        for a, b in zip(acc, big):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_train_step_is_split_independent():
    """Whole iterations (stream, reduce, clip, AdamW) with 1 x 8 and 4 x 2 microbatches agree."""
    results = []
    for mbs in (8, 2):
        cfg = tiny_config(
            "--training.micro_batch_size",
            str(mbs),
            "--training.global_batch_size",
            "8",
            "--training.train_iters",
            "3",
            "--optimizer.lr_warmup_iters",
            "1",
        )
        trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
        assert trainer.train_stream.num_microbatches == 8 // mbs
        history = trainer.train()
        results.append(([r.loss for r in history], [p.detach().clone() for p in trainer.model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_falls_on_mock_data():
    cfg = tiny_config(
        "--training.micro_batch_size",
        "4",
        "--training.global_batch_size",
        "8",
        "--training.train_iters",
        "40",
        "--optimizer.lr",
        "3e-3",
        "--optimizer.min_lr",
        "3e-4",
        "--optimizer.lr_warmup_iters",
        "4",
        "--training.eval_interval",
        "20",
        "--training.eval_iters",
        "2",
    )
    lines: list[str] = []
    trainer = setup_training(cfg, init_runtime(cfg), log=lines.append)
    first = trainer.evaluate()  # the valid split holds samples for one more evaluation than the run does
    history = trainer.train()
    valid = [float(m[1]) for m in map(VALID_RE.search, lines) if m]
    assert history[0].loss > 5.0 and history[0].loss == pytest.approx(first, abs=0.2)
    assert len(valid) == 2 and valid[-1] < valid[0] < first
    assert history[-1].loss < 3.5 and valid[-1] < 3.5
    assert all(not r.skipped for r in history) and history[-1].num_tokens == 8 * 32


def test_mock_dataset_is_deterministic_and_learnable():
    a, b = MockGPTDataset(10, 16, 256, seed=3), MockGPTDataset(10, 16, 256, seed=3, split=1)
    assert (a[4]["tokens"] == MockGPTDataset(10, 16, 256, seed=3)[4]["tokens"]).all()
    assert a[4]["tokens"].shape == (17,) and a[4]["tokens"].min() >= 1
    succ = {int(x): int(y) for x, y in zip(a[0]["tokens"][:-1], a[0]["tokens"][1:])}
    for sample in (a[5]["tokens"], b[2]["tokens"]):  # same successor rule in every split
        assert all(succ.get(int(x), int(y)) == int(y) for x, y in zip(sample[:-1], sample[1:]))


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_recompute_gives_same_gradients(mode, arch):
    cfg = tiny_config("--training.micro_batch_size", "4", "--model.arch", arch, "--model.num_experts", "4")
    runtime = init_runtime(cfg)
    plain = build_local_model(cfg, runtime)
    cfg_rc = copy.deepcopy(cfg)
    cfg_rc.training.recompute = mode
    recomputed = build_local_model(cfg_rc, runtime)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]
    tokens, mask = uneven_batches(4)
    _, g1 = grads_after(plain, tokens, mask, 2, runtime)
    _, g2 = grads_after(recomputed, tokens, mask, 2, runtime)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_selective_recompute_keeps_matmuls_and_recomputes_pointwise(monkeypatch):
    """The policy really sees the block's ops: matmul/attention outputs saved, norms/SiLU recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy

    from megatron_lite.training import model_setup

    decisions: dict[str, set] = {"saved": set(), "recomputed": set()}
    policy = model_setup.selective_policy

    def recording_policy(ctx, op, *args, **kwargs):
        choice = policy(ctx, op, *args, **kwargs)
        saved = choice == CheckpointPolicy.MUST_SAVE
        decisions["saved" if saved else "recomputed"].add(str(getattr(op, "overloadpacket", op)))
        return choice

    monkeypatch.setattr(model_setup, "selective_policy", recording_policy)
    cfg = tiny_config("--training.micro_batch_size", "2", "--training.recompute", "selective")
    runtime = init_runtime(cfg)
    model = build_local_model(cfg, runtime)
    tokens, mask = uneven_batches(2)
    grads_after(model, tokens, mask, 1, runtime)
    assert "aten.mm" in decisions["saved"]
    assert any("scaled_dot_product" in op for op in decisions["saved"])
    assert {"aten.silu", "aten.rsqrt"} <= decisions["recomputed"], decisions["recomputed"]
    assert not decisions["saved"] & decisions["recomputed"]


def test_moe_trains_and_scales_aux_loss():
    cfg = tiny_config(
        "--model.arch",
        "mixtral",
        "--model.num_experts",
        "4",
        "--model.top_k",
        "2",
        "--training.micro_batch_size",
        "2",
        "--training.global_batch_size",
        "8",
        "--training.train_iters",
        "2",
    )
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    history = trainer.train()
    assert all(m.aux_loss_scale == pytest.approx(1 / 4) for m in trainer.model.moe_layers())
    assert history[-1].aux_loss == pytest.approx(1.0, abs=0.3) and history[-1].z_loss > 0
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in history)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_blocks_train_like_eager(recompute):
    """``training.compile``: the same losses and grad norms as eager over 3 steps (CPU inductor)."""
    args = (
        "--training.train_iters",
        "3",
        "--training.micro_batch_size",
        "4",
        "--training.recompute",
        recompute,
    )
    results = []
    for compiled in ("false", "true"):
        cfg = tiny_config(*args, "--training.compile", compiled)
        trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
        results.append([(r.loss, r.grad_norm) for r in trainer.train()])
    for (loss, norm), (ref_loss, ref_norm) in zip(results[1], results[0], strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)

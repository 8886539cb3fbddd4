"""The MoE layer in bf16: bf16 expert GEMMs, counts from the top-k op reused, x/w dtypes reconciled."""

from __future__ import annotations

import pytest
import torch

from megatron_lite import ops
from megatron_lite.models.common.moe import MoE


def _layer(dtype: torch.dtype) -> MoE:
    torch.manual_seed(0)
    layer = MoE(32, 48, num_experts=4, top_k=2, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer.to(dtype)


def _spy(monkeypatch) -> tuple[list, list]:
    """Record the operand dtypes and counts of every expert GEMM, and count torch.bincount calls."""
    gemms, bincounts = [], []
    grouped_mm, bincount = ops.grouped_mm, torch.bincount

    def gemm(x, w, counts):
        gemms.append((x.dtype, w.dtype, counts))
        return grouped_mm(x, w, counts)

    def counting_bincount(*args, **kwargs):
        bincounts.append(1)
        return bincount(*args, **kwargs)

    monkeypatch.setattr(ops, "grouped_mm", gemm)
    monkeypatch.setattr(torch, "bincount", counting_bincount)
    return gemms, bincounts


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bf16_layer_counts_experts_once_and_feeds_bf16_gemms(monkeypatch, backend):
    layer = _layer(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16, requires_grad=True)
    gemms, bincounts = _spy(monkeypatch)
    with ops.use_backend(backend):
        topk = ops.moe_topk_softmax
        calls = []
        monkeypatch.setattr(ops, "moe_topk_softmax", lambda *a: calls.append(topk(*a)) or calls[-1])
        out = layer(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert {(a, b) for a, b, _ in gemms} == {(torch.bfloat16, torch.bfloat16)}
    # Both GEMMs (and the balancing loss) use the very tensor of counts the top-k op returned;
    # the only bincount is the reference top-k's own (the compiled top-k counts in its kernel).
    counts = calls[0][2]
    assert all(c is counts for *_, c in gemms)
    assert len(bincounts) == (1 if backend == "reference" else 0)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in layer.parameters())


def test_fp32_weights_under_autocast_run_the_expert_gemms_in_bf16(monkeypatch):
    """The crash of issue 9 (x bf16, w fp32 in grouped_mm): the layer casts the weights to x's dtype."""
    layer = _layer(torch.float32)
    gemms, _ = _spy(monkeypatch)
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert {(a, b) for a, b, _ in gemms} == {(torch.bfloat16, torch.bfloat16)}
    assert layer.experts.w13.grad.dtype == torch.float32
    ref = _layer(torch.float32)(x.detach())  # fp32 all the way: close, not equal
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)

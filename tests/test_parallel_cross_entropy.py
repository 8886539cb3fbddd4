"""Vocab-parallel cross entropy on one rank (group None) against F.cross_entropy, and loss_fn."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.parallel import ParallelDims, loss_fn, vocab_parallel_cross_entropy


def _data(b=2, s=5, v=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, v, generator=gen) * 3, torch.randint(0, v, (b, s), generator=gen)


def test_single_rank_equals_cross_entropy_values_and_grads():
    logits, labels = _data()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = vocab_parallel_cross_entropy(a, labels, None, 0, 11)
    ref = F.cross_entropy(b.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(ours, ref)
    weights = torch.rand(2, 5)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_padding_columns_never_change_the_loss():
    logits, labels = _data(v=11)
    padded = torch.cat([logits, torch.full((2, 5, 5), 50.0)], dim=-1).requires_grad_()  # junk in padding
    ours = vocab_parallel_cross_entropy(padded, labels, None, 0, 11)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    assert not padded.grad[..., 11:].any()


def test_low_precision_input_is_computed_in_fp32():
    logits, labels = _data()
    half = logits.bfloat16().requires_grad_()
    ours = vocab_parallel_cross_entropy(half, labels, None, 0, 11)
    assert ours.dtype == torch.float32
    ref = F.cross_entropy(half.float().flatten(0, 1), labels.flatten(), reduction="none").view(2, 5)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_loss_fn_masks_and_normalises():
    dims = ParallelDims.build(1)
    dims.create_groups()
    logits, labels = _data()
    labels[0, 0] = -100  # an ignored position: masked, must not produce nan
    mask = torch.ones(2, 5)
    mask[0, 0] = 0
    mask[1, 3] = 0
    per = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100)
    expected = (per * mask.flatten()).sum() / mask.sum()
    torch.testing.assert_close(loss_fn(logits, labels, mask, dims, 11), expected)
    # The trainer passes the global token count: the result then scales by local / global tokens.
    torch.testing.assert_close(
        loss_fn(logits, labels, mask, dims, 11, num_tokens=16.0), expected * mask.sum() / 16.0
    )

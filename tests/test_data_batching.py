"""make_batch: labels, Megatron reset/EOD semantics, cu_seqlens vs EOD positions, loss masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron_lite.ops", reason="packed_seq_metadata not available")
from megatron_lite.data.batching import collate_samples, make_batch  # noqa: E402

EOD = 0


def random_tokens(b=4, s=33, seed=0, eod_rate=0.15):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (b, s), generator=g)
    tokens[torch.rand(b, s, generator=g) < eod_rate] = EOD
    return tokens


def reference_positions(row: list[int]) -> list[int]:
    """Megatron: positions restart right after every EOD."""
    out, start = [], 0
    for i, t in enumerate(row):
        out.append(i - start)
        if t == EOD:
            start = i + 1
    return out


@pytest.mark.parametrize("seed", range(5))
def test_reset_semantics_and_boundaries(seed):
    tokens = random_tokens(seed=seed)
    batch = make_batch(tokens, EOD, True, True, True)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    torch.testing.assert_close(batch.tokens, tokens[:, :-1])
    torch.testing.assert_close(batch.labels, tokens[:, 1:])
    for r in range(b):
        assert batch.position_ids[r].tolist() == reference_positions(batch.tokens[r].tolist())
    assert batch.loss_mask.dtype == torch.float32
    torch.testing.assert_close(batch.loss_mask, (batch.tokens != EOD).float())
    # no token attends across a document boundary: segments end right after each EOD and at rows
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
    flat = batch.tokens.reshape(-1).tolist()
    expected = sorted({p + 1 for p, t in enumerate(flat) if t == EOD} | {r * s for r in range(b + 1)})
    assert cu == expected
    assert batch.max_seqlen == max(np.diff(cu))


def test_no_reset_gives_plain_positions_and_no_cu_seqlens():
    tokens = random_tokens()
    batch = make_batch(tokens, EOD, False, False, False)
    assert batch.cu_seqlens is None and batch.max_seqlen == 32
    assert (batch.position_ids == torch.arange(32)).all()
    assert (batch.loss_mask == 1).all()


def test_reset_attention_only():
    tokens = random_tokens()
    batch = make_batch(tokens, EOD, False, True, False)
    assert batch.cu_seqlens is not None and (batch.position_ids == torch.arange(32)).all()


def test_sample_loss_mask_is_aligned_to_labels():
    tokens = torch.tensor([[1, 5, 6, 7, EOD, 8]])
    stored = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)  # 1 on response tokens 6, 7, EOD
    batch = make_batch(tokens, EOD, True, True, True, sample_loss_mask=stored)
    # position j predicts token j+1: train where the label is a response token and the input is not EOD
    assert batch.loss_mask.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="sample_loss_mask shape"):
        make_batch(tokens, EOD, True, True, True, sample_loss_mask=stored[:, :-1])


def test_bad_tokens_shape():
    with pytest.raises(ValueError, match="seq_length \\+ 1"):
        make_batch(torch.zeros(3, dtype=torch.long), EOD, True, True, True)


def test_collate():
    items = [{"tokens": np.arange(5), "loss_mask": np.ones(5, np.float32)} for _ in range(3)]
    out = collate_samples(items)
    assert out["tokens"].shape == (3, 5) and out["tokens"].dtype == torch.int64
    assert out["loss_mask"].dtype == torch.float32

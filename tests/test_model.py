"""The plain model: attention backends, packing, sliding window, init, meta build."""

import math

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.models import build_model, init_std_for
from megatron_lite.models.common.attention_backends import (
    AttentionMeta,
    causal_attention,
    document_ids,
    select_backend,
)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, intermediate_size=64, max_position_embeddings=256, num_experts=8)
    return tiny_model_config(**{**base, **kw})


def naive_attention(q, k, v, doc, window):
    """Reference: explicit loops over positions, float64."""
    b, s, nq, hd = q.shape
    rep = nq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = torch.zeros_like(q, dtype=torch.float64)
    for bi in range(b):
        for i in range(s):
            keys = [
                j for j in range(i + 1) if doc[bi, j] == doc[bi, i] and (window is None or i - j < window)
            ]
            scores = torch.einsum("hd,jhd->hj", q[bi, i].double(), k[bi, keys].double()) / math.sqrt(hd)
            out[bi, i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[bi, keys].double())
    return out


@pytest.mark.parametrize("nkv", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_matches_naive(nkv, window, packed):
    torch.manual_seed(0)
    b, s, nq, hd = 2, 10, 4, 8
    q, k, v = torch.randn(b, s, nq, hd), torch.randn(b, s, nkv, hd), torch.randn(b, s, nkv, hd)
    cu = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32) if packed else None
    meta = AttentionMeta(cu_seqlens=cu, max_seqlen=7 if packed else None, window=window)
    out = causal_attention(q, k, v, meta)
    ref = naive_attention(q, k, v, document_ids(cu, b, s, "cpu"), window)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_document_ids_from_cu_seqlens():
    cu = torch.tensor([0, 3, 5, 8, 12], dtype=torch.int32)
    ids = document_ids(cu, 2, 6, "cpu")
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2], [2, 2, 3, 3, 3, 3]]


def test_backend_selection_and_errors():
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, packed=False, window=None) == "sdpa"
    assert select_backend("auto", cpu, packed=True, window=None) == "sdpa_masked"
    assert select_backend("auto", cpu, packed=False, window=8) == "sdpa_masked"
    with pytest.raises(RuntimeError, match="plain causal"):
        select_backend("sdpa", cpu, packed=True, window=None)
    with pytest.raises(RuntimeError, match="CUDA"):
        select_backend("flex", cpu, packed=True, window=None)
    with pytest.raises(ValueError, match="not one of"):
        select_backend("nope", cpu, packed=False, window=None)


def test_packed_rows_equal_separate_documents():
    """Two documents packed in one row give the logits each gets alone (positions restart)."""
    torch.manual_seed(0)
    cfg = tiny_cfg(sliding_window=4)
    model = build_model(cfg, seed=1).eval()
    a, c = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, c], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, position_ids=pos, cu_seqlens=cu, max_seqlen=7)
        ref = torch.cat([model(a), model(c)], dim=1)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("window", [None, 16])
def test_flex_block_mask_matches_reference(window):
    """The FlexAttention mask used on GPU (run eagerly here, forward only) equals the naive reference."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from megatron_lite.models.common.attention_backends import flex_block_mask as _flex_block_mask

    torch.manual_seed(0)
    b, s = 2, 128  # FlexAttention works in 128-token blocks
    q, k, v = torch.randn(b, s, 4, 16), torch.randn(b, s, 2, 16), torch.randn(b, s, 2, 16)
    cu = torch.tensor([0, 20, 128, 130, 256], dtype=torch.int32)  # a 2-token document too
    block_mask = _flex_block_mask(cu, b, s, window, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is meant to be compiled
        out = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=block_mask, enable_gqa=True)
    ref = naive_attention(q, k, v, document_ids(cu, b, s, "cpu"), window)
    torch.testing.assert_close(out.transpose(1, 2), ref.to(out.dtype), atol=1e-5, rtol=1e-5)


def test_masks_are_built_once_per_forward(monkeypatch):
    from megatron_lite.models.common import attention_backends

    calls = []
    build = attention_backends._dense_mask
    monkeypatch.setattr(attention_backends, "_dense_mask", lambda *a: calls.append(1) or build(*a))
    model = build_model(tiny_cfg(num_layers=3, sliding_window=4), seed=1)
    tokens = torch.randint(0, 97, (2, 12))
    model(tokens, cu_seqlens=torch.tensor([0, 5, 12, 24], dtype=torch.int32), max_seqlen=7)
    assert len(calls) == 1  # three layers, one mask


def test_meta_build_allocates_nothing_and_init_is_megatron_style():
    cfg = tiny_cfg(num_layers=4, hidden_size=64, intermediate_size=256, init_std=0.02)
    meta = build_model(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    model = build_model(cfg, seed=3)
    scaled = 0.02 / math.sqrt(8.0)
    assert init_std_for("layers.0.attention.wo.weight", cfg) == pytest.approx(scaled)
    assert init_std_for("layers.0.feed_forward.experts.w2", cfg) == pytest.approx(scaled)
    assert init_std_for("layers.0.ffn_norm.weight", cfg) is None
    w2 = torch.cat([model.layers[str(i)].feed_forward.w2.weight.flatten() for i in range(4)])
    assert w2.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(64))
    again = build_model(cfg, seed=3)
    assert torch.equal(again.layers["2"].attention.wqkv.weight, model.layers["2"].attention.wqkv.weight)


def test_tied_embeddings_share_one_weight():
    cfg = tiny_cfg(tie_embeddings=True)
    model = build_model(cfg)
    assert model.output is None and "output.weight" not in model.state_dict()
    x = torch.randint(0, 97, (1, 5))
    h = model.norm(model.tok_embeddings(x))
    assert model.logits(h).shape == (1, 5, 97)


def test_pipeline_stage_keeps_canonical_names():
    cfg = tiny_cfg(num_layers=4)
    stage = build_model(cfg, layer_ids=range(2, 4), pre_process=False, post_process=True)
    names = set(stage.state_dict())
    assert "layers.2.attention.wqkv.weight" in names and "layers.0.attention.wqkv.weight" not in names
    assert "tok_embeddings.weight" not in names and "output.weight" in names
    hidden = torch.randn(2, 6, 32)
    assert stage(hidden).shape == (2, 6, 97)


def test_config_errors_name_the_field():
    with pytest.raises(
        ConfigError, match=r"model.num_attention_heads \(6\) is not divisible by model.num_kv_heads \(4\)"
    ):
        tiny_cfg(num_attention_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match="model.arch"):
        tiny_cfg(arch="gpt2")  # llama is a registered family since issue 11
    with pytest.raises(ConfigError, match="model.top_k"):
        tiny_cfg(arch="mixtral", num_experts=4, top_k=5)

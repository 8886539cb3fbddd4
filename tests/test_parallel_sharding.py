"""The sharding description without processes: round trips, fused layouts, padding, init of shards."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import ModelConfig
from megatron_lite.parallel import (
    ParallelDims,
    padded_vocab_size,
    shard_spec_for,
    shard_tensor,
    unshard_tensors,
)
from megatron_lite.parallel.init import counter_normal, init_full_tensor, init_local_tensor
from megatron_lite.parallel.sharding import local_shape, replicated_rows

HD = 16


def _cfg(arch="mixtral", kv=2, tie=False) -> ModelConfig:
    cfg = tiny_model_config(
        arch,
        vocab_size=250,
        hidden_size=64,
        intermediate_size=128,
        num_kv_heads=kv,
        max_position_embeddings=32768,
        tie_embeddings=tie,
    )
    return cfg


def _names(cfg):
    names = [
        "tok_embeddings.weight",
        "output.weight",
        "norm.weight",
        "layers.1.attention_norm.weight",
        "layers.1.ffn_norm.weight",
        "layers.1.attention.wqkv.weight",
        "layers.1.attention.wo.weight",
    ]
    if cfg.is_moe:
        names += [
            "layers.1.feed_forward.router.weight",
            "layers.1.feed_forward.experts.w13",
            "layers.1.feed_forward.experts.w2",
        ]
    else:
        names += ["layers.1.feed_forward.w13.weight", "layers.1.feed_forward.w2.weight"]
    return names


LAYOUTS = [
    dict(world_size=1),
    dict(world_size=2, tp=2),
    dict(world_size=4, tp=4),
    dict(world_size=8, tp=2, ep=4),
    dict(world_size=8, tp=4, ep=2, etp=2),
    dict(world_size=8, tp=4, ep=4, etp=1),
    dict(world_size=8, tp=2, pp=2, ep=2, etp=1),
    dict(world_size=16, tp=4, ep=4, etp=4),
]


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_shard_unshard_round_trip(arch, kv, layout):
    cfg = _cfg(arch, kv)
    dims = ParallelDims.build(**layout)
    gen = torch.Generator().manual_seed(0)
    for name in _names(cfg):
        spec = shard_spec_for(name, cfg)
        full = torch.randn(spec.shape, generator=gen)
        shards = {r: shard_tensor(full, name, cfg, dims.coords(r)) for r in range(dims.world_size)}
        for r, t in shards.items():
            assert tuple(t.shape) == local_shape(spec, dims.coords(r))
        back = unshard_tensors(shards, name, cfg, dims, check_replicas=True)
        assert torch.equal(back, full), name


def test_fused_qkv_layout_replicates_kv_heads():
    cfg = _cfg("mistral", kv=2)
    dims = ParallelDims.build(4, tp=4)
    full = torch.arange(8 * HD).float().unsqueeze(1).expand(8 * HD, 64).contiguous()  # row id in col 0
    name = "layers.0.attention.wqkv.weight"
    for r in range(4):
        rows = shard_tensor(full, name, cfg, dims.coords(r))[:, 0].long()
        kv_head = r // 2  # rank r gets KV head r // (tp // nkv)
        expected = torch.cat(
            [
                torch.arange(r * HD, (r + 1) * HD),  # Q head r
                4 * HD + torch.arange(kv_head * HD, (kv_head + 1) * HD),  # K head
                6 * HD + torch.arange(kv_head * HD, (kv_head + 1) * HD),
            ]
        )  # V head
        assert torch.equal(rows, expected)
        pieces, units = replicated_rows(shard_spec_for(name, cfg), dims.coords(r))
        assert units == 2 and pieces == ((HD, 2 * HD, kv_head), (2 * HD, 3 * HD, kv_head))
    assert replicated_rows(shard_spec_for(name, _cfg("mistral", kv=4)), dims.coords(1)) is None


def test_fused_gate_up_and_expert_layout():
    cfg = _cfg("mixtral")
    dims = ParallelDims.build(4, tp=2, ep=2, etp=2)
    f = cfg.intermediate_size
    full = torch.arange(4 * 2 * f).float().view(4, 2 * f, 1).expand(4, 2 * f, 64).contiguous()
    for r in range(4):
        c = dims.coords(r)
        local = shard_tensor(full, "layers.0.feed_forward.experts.w13", cfg, c)[..., 0].long()  # [El, 2F/etp]
        half = f // 2
        for i in range(2):
            e = c.ep * 2 + i
            gate = e * 2 * f + torch.arange(c.etp * half, (c.etp + 1) * half)
            assert torch.equal(local[i], torch.cat([gate, gate + f]))


def test_vocab_padding():
    assert [padded_vocab_size(250, tp) for tp in (1, 2, 4)] == [256, 256, 512]
    assert padded_vocab_size(32000, 8) == 32768 and padded_vocab_size(32000, 1) == 32000
    cfg = _cfg("mistral")
    dims = ParallelDims.build(4, tp=4)
    full = torch.randn(250, 64)
    shards = [shard_tensor(full, "output.weight", cfg, dims.coords(r)) for r in range(4)]
    assert all(s.shape == (128, 64) for s in shards)
    assert torch.equal(shards[1][:122], full[128:]) and not shards[1][122:].any()
    assert not shards[2].any() and not shards[3].any()


def test_unshard_errors():
    cfg = _cfg("mistral")
    dims = ParallelDims.build(4, tp=4)
    name = "layers.0.attention.wo.weight"
    full = torch.randn(64, 64)
    shards = {r: shard_tensor(full, name, cfg, dims.coords(r)) for r in range(4)}
    with pytest.raises(ValueError, match="do not cover"):
        unshard_tensors({r: shards[r] for r in (0, 1, 2)}, name, cfg, dims)
    with pytest.raises(ValueError, match="expected"):
        unshard_tensors({0: shards[0][:, :3]}, name, cfg, dims)
    qkv = "layers.0.attention.wqkv.weight"
    bad = {r: shard_tensor(torch.randn(8 * HD, 64), qkv, cfg, dims.coords(r)) for r in range(4)}
    bad[1] = bad[1] + 1.0  # rank 1 disagrees with rank 0 about KV head 0
    with pytest.raises(ValueError, match="disagrees"):
        unshard_tensors(bad, qkv, cfg, dims, check_replicas=True)
    with pytest.raises(KeyError, match="no sharding rule"):
        shard_spec_for("layers.0.attention.bias", cfg)
    with pytest.raises(ValueError, match="expected full shape"):
        shard_tensor(torch.randn(3, 3), name, cfg, dims.coords(0))


def test_init_local_shards_are_consistent():
    cfg = _cfg("mixtral", kv=1)
    dims = ParallelDims.build(4, tp=4, ep=2, etp=2)
    name = "layers.0.attention.wqkv.weight"
    shards = {r: init_local_tensor(name, cfg, dims.coords(r), seed=3) for r in range(4)}
    unshard_tensors(shards, name, cfg, dims, check_replicas=True)  # KV replicas identical
    again = init_local_tensor(name, cfg, dims.coords(2), seed=3)
    assert torch.equal(again, shards[2])
    assert not torch.equal(init_local_tensor(name, cfg, dims.coords(2), seed=4), shards[2])
    emb = [init_local_tensor("tok_embeddings.weight", cfg, dims.coords(r), 0) for r in range(4)]
    full = unshard_tensors(dict(enumerate(emb)), "tok_embeddings.weight", cfg, dims)
    assert abs(full.std().item() - cfg.init_std) < 0.002
    assert not emb[1][122:].any() and not emb[3].any()  # padding rows are zero
    w2 = torch.cat(
        [
            init_local_tensor("layers.0.feed_forward.experts.w2", cfg, dims.coords(r), 0).flatten()
            for r in range(4)
        ]
    )
    assert abs(w2.std().item() - cfg.init_std / math.sqrt(2 * cfg.num_layers)) < 0.001
    assert torch.equal(init_local_tensor("norm.weight", cfg, dims.coords(1), 0), torch.ones(64))
    router_name = "layers.0.feed_forward.router.weight"
    router = {r: init_local_tensor(router_name, cfg, dims.coords(r), 0) for r in range(4)}
    unshard_tensors(router, router_name, cfg, dims, check_replicas=True)


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=str)
def test_init_is_layout_independent(layout):
    cfg = _cfg("mixtral", kv=1)
    dims = ParallelDims.build(**layout)
    for name in _names(cfg):
        shards = {r: init_local_tensor(name, cfg, dims.coords(r), seed=5) for r in range(dims.world_size)}
        full = unshard_tensors(shards, name, cfg, dims, check_replicas=True)
        assert torch.equal(full, init_full_tensor(name, cfg, seed=5)), name


def test_counter_normal_statistics():
    x = counter_normal(torch.arange(1 << 20), key=12345)
    assert abs(x.mean().item()) < 0.005 and abs(x.std().item() - 1.0) < 0.005
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()) < 0.005
    assert (x.abs() > 4).float().mean().item() < 1e-4
    assert not torch.equal(x[:100], counter_normal(torch.arange(100), key=12346))


def test_materialize_plain_model_matches_full_init():
    from megatron_lite.models import build_model
    from megatron_lite.parallel import materialize_local

    cfg = _cfg("mixtral")
    dims = ParallelDims.build(1)
    dims.create_groups()
    model = materialize_local(build_model(cfg, "meta"), dims, seed=9)
    assert model.tok_embeddings.weight.shape == (250, 64)  # no vocabulary padding on the plain model
    for name, param in model.named_parameters():
        assert torch.equal(param, init_full_tensor(name, cfg, seed=9)), name

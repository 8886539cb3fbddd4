"""ParallelDims and validate_layout without processes: rank order, group partitions, error messages."""

from __future__ import annotations

import itertools

import pytest
from conftest import tiny_model_config

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig
from megatron_lite.parallel import ParallelDims, validate_layout
from megatron_lite.parallel.dims import GROUP_NAMES


def _layouts(max_world: int = 64):
    """Every valid (world, tp, pp, ep, etp) with small powers of two and some odd sizes."""
    for world in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64):
        if world > max_world:
            continue
        for tp, pp, ep, etp in itertools.product((1, 2, 3, 4, 8), (1, 2, 4), (1, 2, 4, 8), (1, 2, 4)):
            try:
                yield ParallelDims.build(world, tp=tp, pp=pp, ep=ep, etp=etp)
            except ConfigError:
                continue


def test_many_layouts_partition_the_world():
    count = 0
    for dims in _layouts():
        count += 1
        assert dims.tp * dims.dp * dims.pp == dims.world_size
        assert dims.etp * dims.ep * dims.edp == dims.tp * dims.dp
        for name in GROUP_NAMES:
            if name == "embedding":
                continue
            groups = dims.rank_lists(name)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(dims.world_size)), (dims, name)
            assert len({len(g) for g in groups}) == 1, (dims, name)
        sizes = {
            "tp": dims.tp,
            "dp": dims.dp,
            "pp": dims.pp,
            "etp": dims.etp,
            "ep": dims.ep,
            "edp": dims.edp,
            "mp": dims.tp * dims.pp,
            "tp_dp": dims.tp * dims.dp,
            "etp_ep": dims.etp * dims.ep,
        }
        for name, size in sizes.items():
            assert len(dims.rank_lists(name)[0]) == size, (dims, name)
        for rank in range(dims.world_size):
            c = dims.coords(rank)
            assert rank == c.tp + dims.tp * (c.dp + dims.dp * c.pp)
            assert rank == c.etp + dims.etp * (c.ep + dims.ep * (c.edp + dims.edp * c.pp))
            # a rank's index in each group is its position in the group's rank list
            for name in ("tp", "dp", "pp", "etp", "ep", "edp"):
                assert dims.group_ranks(name, rank).index(rank) == c.index(name)
    assert count > 100


def test_megatron_rank_order_example():
    # 16 ranks, tp 2, pp 2 -> dp 4. TP groups are consecutive, PP groups stride tp*dp.
    dims = ParallelDims.build(16, tp=2, pp=2, ep=2)
    assert dims.dp == 4 and dims.etp == 2 and dims.edp == 2
    assert dims.rank_lists("tp")[:2] == [[0, 1], [2, 3]]
    assert dims.rank_lists("dp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.rank_lists("pp")[0] == [0, 8]
    # etp == tp: EP groups sit inside DP groups (ep varies right after tp)
    assert dims.rank_lists("ep")[:2] == [[0, 2], [1, 3]]
    assert dims.rank_lists("edp")[0] == [0, 4]
    assert dims.rank_lists("embedding")[0] == [0, 8]
    assert dims.coords(13) == dims.coords(13)
    c = dims.coords(13)
    assert (c.tp, c.dp, c.pp, c.etp, c.ep, c.edp) == (1, 2, 1, 1, 0, 1)


def test_expert_folding_with_etp_smaller_than_tp():
    # tp 4 for attention, experts not tensor-parallel: 4 ranks of a TP group are an EP group.
    dims = ParallelDims.build(8, tp=4, ep=4, etp=1)
    assert (dims.dp, dims.edp) == (2, 2)
    assert dims.rank_lists("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.rank_lists("etp_ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.rank_lists("edp")[0] == [0, 4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(world_size=6, tp=4),
            "world_size (6) is not divisible by tensor_parallel (4) x pipeline_parallel (1) = 4",
        ),
        (
            dict(world_size=8, tp=2, pp=4, ep=4),
            "expert_tensor_parallel (2) x expert_parallel (4) = 8 does not divide "
            "tensor_parallel (2) x data_parallel (1) = 2",
        ),
        (dict(world_size=4, tp=0), "tensor_parallel (0) must be a positive integer"),
        (
            dict(world_size=6, cp=4),
            "world_size (6) is not divisible by tensor_parallel (1) x context_parallel (4) x "
            "pipeline_parallel (1)",
        ),
    ],
)
def test_bad_grids_name_the_degrees(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ParallelDims.build(**kwargs)
    assert message in str(err.value)


def _model(**kw) -> ModelConfig:
    base = dict(
        arch="mistral",
        vocab_size=250,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=32,
        num_kv_heads=8,
        num_experts=8,
        head_dim=16,
        max_position_embeddings=32768,
    )
    return tiny_model_config(**{**base, **kw})


@pytest.mark.parametrize(
    "model_kw, par_kw, world, message",
    [
        ({}, dict(tensor=3), 3, "model.num_attention_heads (32) is not divisible by tensor_parallel (3)"),
        (
            dict(num_attention_heads=12, num_kv_heads=6),
            dict(tensor=4),
            4,
            "model.num_kv_heads (6) is not divisible by tensor_parallel (4)",
        ),
        (
            dict(num_attention_heads=12, num_kv_heads=3),
            dict(tensor=4),
            4,
            "tensor_parallel (4) is not divisible by model.num_kv_heads (3)",
        ),
        (
            dict(num_attention_heads=24, num_kv_heads=12),
            dict(tensor=16),
            16,
            "model.num_attention_heads (24) is not divisible by tensor_parallel (16)",
        ),
        (
            dict(arch="mixtral", num_experts=6),
            dict(expert=4),
            4,
            "model.num_experts (6) is not divisible by expert_parallel (4)",
        ),
        (
            dict(intermediate_size=100),
            dict(tensor=8),
            8,
            "model.intermediate_size (100) is not divisible by tensor_parallel (8)",
        ),
        (
            dict(arch="mixtral", intermediate_size=100),
            dict(tensor=8, expert=1, expert_tensor=8),
            8,
            "model.intermediate_size (100) is not divisible by expert_tensor_parallel (8)",
        ),
        ({}, dict(expert=2), 2, "expert_parallel (2) > 1 needs a mixture-of-experts model"),
        (
            {},
            dict(tensor=2, pipeline=2),
            6,
            "world_size (6) is not divisible by tensor_parallel (2) x pipeline_parallel (2) = 4",
        ),
    ],
)
def test_validate_layout_messages(model_kw, par_kw, world, message):
    with pytest.raises(ConfigError) as err:
        validate_layout(_model(**model_kw), ParallelConfig(**par_kw), world)
    assert message in str(err.value)


def test_validate_layout_accepts_replicated_kv_and_checks_sequence():
    cfg = _model(num_attention_heads=32, num_kv_heads=2)
    dims = validate_layout(cfg, ParallelConfig(tensor=8, sequence_parallel=True), 16, seq_length=4096)
    assert (dims.tp, dims.dp) == (8, 2)
    with pytest.raises(ConfigError, match=r"seq_length \(100\) is not divisible by tensor_parallel \(8\)"):
        validate_layout(cfg, ParallelConfig(tensor=8, sequence_parallel=True), 8, seq_length=100)


def test_groups_need_creation_and_single_rank_works_without_distributed():
    dims = ParallelDims.build(1)
    with pytest.raises(RuntimeError, match="create_groups"):
        dims.group("tp")
    dims.create_groups()
    assert dims.group("tp") is None and dims.local.rank == 0
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ParallelDims.build(2).create_groups()

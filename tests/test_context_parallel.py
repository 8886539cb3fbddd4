"""Context parallelism: the rank grid, load-balanced sharding, and cp attention == one process.

The equality tests run every layout on one set of 4 gloo processes: each rank builds the
single-process reference on the same packed batch, the cp model from the same weights, runs its
two chunks of every row, sums gradients over dp x cp and compares the loss and every gradient.
Tolerance: fp32, 1e-5 (the same as the other layout tests): the cp model sums the same products
in another order (gathered keys, per-rank loss sums, the K/V gradient reduce-scatter).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model_config
from dist_utils import run_distributed

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig
from megatron_lite.data.batching import make_batch
from megatron_lite.models import build_model
from megatron_lite.parallel import (
    ParallelDims,
    allreduce_gradients,
    load_full_state_dict,
    loss_fn,
    materialize_local,
    parallelize,
    unshard_tensors,
    validate_layout,
)
from megatron_lite.parallel.context import gathered_order, global_positions, shard_batch, split_sequence

BATCH, SEQ, VOCAB, EOD = 2, 32, 250, 0


# ---------------------------------------------------------------- pure arithmetic (no processes)


def test_rank_order_tp_fastest_then_cp_then_dp_then_pp():
    dims = ParallelDims.build(16, tp=2, cp=2, pp=2)  # dp 2
    assert (dims.dp, dims.cp) == (2, 2)
    c = dims.coords(1 + 2 * 1 + 4 * 1 + 8 * 1)  # tp 1, cp 1, dp 1, pp 1
    assert (c.tp, c.cp, c.dp, c.pp, c.dp_cp) == (1, 1, 1, 1, 3)
    assert dims.rank_lists("cp")[:2] == [[0, 2], [1, 3]]
    assert dims.rank_lists("dp_cp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.rank_lists("dp")[:2] == [[0, 4], [1, 5]]
    assert dims.rank_lists("tp")[:2] == [[0, 1], [2, 3]]
    assert dims.rank_lists("tp_dp")[0] == list(range(8))  # a stage: tp x cp x dp
    assert dims.edp == 4  # the stage's 8 ranks over etp (= tp) 2: cp ranks are expert-data-parallel


def test_load_balanced_split_and_gather_order():
    t = torch.arange(16).view(1, 16)
    parts = [split_sequence(t, r, 4) for r in range(4)]
    assert parts[0].tolist() == [[0, 1, 14, 15]] and parts[3].tolist() == [[6, 7, 8, 9]]
    for r in range(4):
        assert global_positions(r, 4, 4).tolist() == parts[r][0].tolist()
    gathered = torch.cat(parts, dim=1)
    assert torch.equal(gathered[:, gathered_order(4, 4)], t)


def test_invalid_cp_layouts_refused():
    cfg = tiny_model_config(
        "mistral",
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=32768,
        num_experts=8,
    )
    with pytest.raises(
        ConfigError, match=r"data.seq_length \(36\) is not divisible by 2 x parallel.context \(4\) = 8"
    ):
        validate_layout(cfg, ParallelConfig(context=4), 4, 36)
    with pytest.raises(ConfigError, match=r"world_size \(6\) is not divisible by .*context_parallel \(4\)"):
        validate_layout(cfg, ParallelConfig(context=4), 6, 32)
    with pytest.raises(
        ConfigError, match=r"data.seq_length \(20\) / parallel.context \(2\) = 10 .*tensor_parallel \(4\)"
    ):
        validate_layout(cfg, ParallelConfig(context=2, tensor=4, sequence_parallel=True), 8, 20)


# ---------------------------------------------------------------- equality on gloo processes


def _packed_batch():
    """Rows of several documents (EOD-separated), positions restart, no cross-document attention."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=gen)
    tokens[0, [5, 13, 14, 27]] = EOD  # documents of several lengths, one of length 1
    tokens[1, [20]] = EOD
    return make_batch(tokens, EOD, True, True, False)


def _config(arch: str, window: int | None) -> ModelConfig:
    return tiny_model_config(arch, vocab_size=VOCAB, intermediate_size=64, sliding_window=window)


def check_cp(world: int, arch: str, cp: int, window: int | None = None, tp: int = 1, sp: bool = False):
    """One layout on the current process group; AssertionError naming the layout on a mismatch."""
    cfg = _config(arch, window)
    pcfg = ParallelConfig(tensor=tp, sequence_parallel=sp, context=cp)
    dims = ParallelDims.from_config(pcfg, world)
    dims.create_groups()
    tag = f"{arch} cp={cp} tp={tp} sp={sp} dp={dims.dp} window={window}"
    batch = _packed_batch()

    ref = build_model(cfg, "cpu", seed=0)
    logits = ref(batch.tokens, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), reduction="none"
    )
    ref_loss = (per_token * batch.loss_mask.flatten()).sum() / batch.loss_mask.sum()
    ref_loss.backward()

    model = build_model(cfg, "meta")
    parallelize(model, dims, pcfg)
    materialize_local(model, dims, seed=7)
    load_full_state_dict(model, ref.state_dict(), dims)
    c = dims.local
    rows = slice(c.dp * BATCH // dims.dp, (c.dp + 1) * BATCH // dims.dp)
    if dims.dp > 1:  # this dp rank's rows, re-packed on their own (as the data loader would)
        tokens = torch.cat([batch.tokens[rows], batch.labels[rows][:, -1:]], dim=1)
        mine = make_batch(tokens, EOD, True, True, False)
    else:
        mine = batch
    local = shard_batch(mine, c.cp, dims.cp)
    out = model(local.tokens, local.position_ids, local.cu_seqlens, local.max_seqlen)
    loss = loss_fn(out, local.labels, local.loss_mask, dims, VOCAB, num_tokens=batch.loss_mask.sum())
    loss.backward()
    allreduce_gradients(model, dims)

    total = loss.detach().clone()
    dist.all_reduce(total, group=dims.group("dp_cp"))
    torch.testing.assert_close(
        total, ref_loss.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{tag}: loss {m}"
    )
    grads = {n: p.grad for n, p in model.named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, grads)
    for name, ref_param in ref.named_parameters():
        full = unshard_tensors(
            {r: gathered[r][name] for r in range(world)}, name, cfg, dims, check_replicas=True, atol=1e-6
        )
        torch.testing.assert_close(
            full, ref_param.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{tag}: grad of {name}: {m}"
        )
    dims.destroy_groups()


def _body(rank, world):
    # SEQ 32: a cp-2 chunk has 8 tokens, a cp-4 chunk 4; window 3 is shorter than either chunk,
    # 12 longer than both (but shorter than the sequence)
    for window in (None, 3, 12):
        check_cp(world, "mistral", cp=2, window=window)  # dp 2
        check_cp(world, "mistral", cp=4, window=window)
    check_cp(world, "mixtral", cp=4, window=3)
    check_cp(world, "mixtral", cp=2, window=12)  # dp 2
    check_cp(world, "mistral", cp=2, window=3, tp=2, sp=True)


@pytest.mark.slow
def test_cp_matches_single_process():
    run_distributed(_body, 4)


def test_run_config_refuses_cp_misfits_before_any_group():
    from tiny import TINY_MODEL

    from megatron_lite.config import load_config
    from megatron_lite.training.runtime import check_run_config

    base = [*TINY_MODEL, "--data.mock", "true", "--data.seq_length", "36", "--parallel.context", "4"]
    with pytest.raises(
        ConfigError, match=r"^data.seq_length \(36\) is not divisible by 2 x parallel.context \(4\)"
    ):
        check_run_config(load_config(None, base), 4)
    sdpa = [
        *base[:-4],
        "--data.seq_length",
        "32",
        "--parallel.context",
        "2",
        "--training.attention_backend",
        "sdpa",
    ]
    with pytest.raises(
        ConfigError, match=r"^training.attention_backend 'sdpa' cannot serve parallel.context \(2\)"
    ):
        check_run_config(load_config(None, sdpa), 2)

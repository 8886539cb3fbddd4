"""Parallel Mistral/Mixtral == single-process model: loss and every gradient, on real gloo ranks.

Each test spawns 4 processes once and checks several layouts in turn (process start-up
dominates the run time on small CI machines). For every layout each rank builds the
single-process reference on the same global batch, builds the parallel model on the meta device,
parallelizes it, materializes it, loads the reference weights through the sharding description,
runs forward/backward on its data-parallel slice, sums gradients, and compares the loss and
every gradient (reassembled with ``unshard_tensors``) to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import tiny_model_config
from dist_utils import run_distributed

from megatron_lite.config import ModelConfig, ParallelConfig
from megatron_lite.models import build_model
from megatron_lite.parallel import (
    ParallelDims,
    allreduce_gradients,
    load_full_state_dict,
    loss_fn,
    materialize_local,
    parallelize,
    unshard_tensors,
)

pytestmark = pytest.mark.slow

BATCH, SEQ, VOCAB = 4, 16, 250  # 250: not a multiple of 128, so vocabulary padding is exercised


def tiny_config(arch: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128)
    return tiny_model_config(arch, **{**base, **overrides})


def _batch():
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return ids, labels, mask


def _force_routing(model, cfg):
    """Send every token to experts 0 and 1 (all on the first EP rank(s)): others get zero tokens."""
    bias = torch.zeros(cfg.num_experts)
    bias[:2] = 20.0
    for moe in model.moe_layers():
        moe.router.register_forward_hook(lambda mod, args, out: out + bias)


def check_layout(
    world: int,
    arch: str,
    tp: int = 1,
    sp: bool = False,
    ep: int = 1,
    etp=None,
    dispatcher: str = "alltoall",
    force_routing: bool = False,
    from_cpu: bool = False,
    **model_overrides,
) -> None:
    """One layout on the current process group; raises AssertionError on any mismatch.

    ``from_cpu``: parallelize a real CPU copy of the reference (shards sliced from its weights)
    instead of the meta -> materialize -> load path.
    """
    cfg = tiny_config(arch, **model_overrides)
    pcfg = ParallelConfig(
        tensor=tp, expert=ep, expert_tensor=etp, sequence_parallel=sp, moe_dispatcher=dispatcher
    )
    dims = ParallelDims.from_config(pcfg, world)
    dims.create_groups()
    tag = f"{arch} tp={tp} sp={sp} ep={ep} etp={etp} {dispatcher} {model_overrides}"
    ids, labels, mask = _batch()

    ref = build_model(cfg, "cpu", seed=0)
    if force_routing:
        _force_routing(ref, cfg)
    logits = ref(ids)
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ref_loss = (per_token * mask.flatten()).sum() / mask.sum()
    ref_loss.backward()

    if from_cpu:
        model = parallelize(build_model(cfg, "cpu", seed=0), dims, pcfg)
    else:
        model = build_model(cfg, "meta")
        parallelize(model, dims, pcfg)
        materialize_local(model, dims, seed=7)
        load_full_state_dict(model, ref.state_dict(), dims)
    if force_routing:
        _force_routing(model, cfg)
    c = dims.local
    rows = slice(c.dp * BATCH // dims.dp, (c.dp + 1) * BATCH // dims.dp)
    out = model(ids[rows])
    loss = loss_fn(out, labels[rows], mask[rows], dims, VOCAB, num_tokens=mask.sum())
    loss.backward()
    allreduce_gradients(model, dims)

    total = loss.detach().clone()
    dist.all_reduce(total, group=dims.group("dp"))
    torch.testing.assert_close(
        total, ref_loss.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{tag}: loss {m}"
    )
    for ref_moe, moe in zip(ref.moe_layers(), model.moe_layers()):
        torch.testing.assert_close(moe.last_aux_loss, ref_moe.last_aux_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.last_z_loss, ref_moe.last_z_loss, atol=1e-5, rtol=1e-5)

    grads = {n: p.grad for n, p in model.named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, grads)
    ref_params = dict(ref.named_parameters())
    assert set(grads) == set(ref_params), f"{tag}: names {set(grads) ^ set(ref_params)}"
    for name, ref_param in ref_params.items():
        full = unshard_tensors(
            {r: gathered[r][name] for r in range(world)}, name, cfg, dims, check_replicas=True, atol=1e-6
        )
        torch.testing.assert_close(
            full, ref_param.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{tag}: grad of {name}: {m}"
        )
    if force_routing:
        empty_ranks = [r for r in range(world) if not gathered[r]["layers.0.feed_forward.experts.w13"].any()]
        assert empty_ranks, f"{tag}: expected some EP ranks without tokens"
    dims.destroy_groups()


def _dense_body(rank, world):
    check_layout(world, "mistral", tp=4)  # kv 2 < tp 4: KV heads replicated twice
    check_layout(world, "mistral", tp=4, sp=True)
    check_layout(world, "mistral", tp=2, sp=True)  # dp 2
    check_layout(world, "mistral", tp=2, tie_embeddings=True, from_cpu=True)
    check_layout(world, "mistral", tp=1)  # dp 4
    check_layout(world, "mistral", tp=4, sp=True, num_kv_heads=1, tie_embeddings=True)  # MQA, kv x4


def _moe_body(rank, world):
    check_layout(world, "mixtral", ep=4)  # dp 4 = ep 4
    check_layout(world, "mixtral", ep=2, dispatcher="allgather")  # edp 2
    check_layout(world, "mixtral", tp=2, sp=True, ep=2)  # etp 2: experts tensor-parallel too
    check_layout(world, "mixtral", tp=2, ep=2, etp=1)  # no SP: tokens split by hooks
    check_layout(world, "mixtral", tp=4, sp=True, dispatcher="allgather")  # ep 1, etp 4
    check_layout(world, "mixtral", tp=2, sp=True, ep=2, etp=1, dispatcher="allgather")
    check_layout(world, "mixtral", tp=1, ep=1, from_cpu=True)


def _zero_token_body(rank, world):
    check_layout(world, "mixtral", ep=4, force_routing=True)
    check_layout(world, "mixtral", tp=2, sp=True, ep=2, force_routing=True)
    check_layout(world, "mixtral", ep=4, dispatcher="allgather", force_routing=True)


def test_dense_layouts_match_single_process():
    run_distributed(_dense_body, 4)


def test_moe_layouts_match_single_process():
    run_distributed(_moe_body, 4)


def test_moe_ranks_without_tokens():
    run_distributed(_zero_token_body, 4)

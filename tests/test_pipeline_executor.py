"""The pipeline executor == the unpipelined model: loss, MoE losses and every gradient, on gloo ranks.

Each test spawns its processes once and loops over layouts and schedules inside the workers
(process start-up dominates on small CI machines). For every layout each rank builds the
single-process reference on the same global batch (packed documents: position ids and
``cu_seqlens`` restart at EOD), builds its pipeline stage on the meta device, parallelizes and
materializes it, loads the reference weights by canonical name, runs its schedule's action list
with the executor and compares every local gradient with the matching shard of the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_model_config
from dist_utils import run_distributed

from megatron_lite.config import Config, DataConfig, ParallelConfig, TrainingConfig
from megatron_lite.data.batching import make_batch
from megatron_lite.models import build_model
from megatron_lite.parallel import ParallelDims, load_full_state_dict, materialize_local, parallelize
from megatron_lite.parallel.sharding import shard_tensor
from megatron_lite.pipeline.executor import PipelineExecutor, warm_up
from megatron_lite.pipeline.schedules import build_schedule, forward_only
from megatron_lite.pipeline.stages import activation_shape, model_chunks, stage_layer_ids, stage_roles
from megatron_lite.training.model_setup import masked_loss_sum, reduce_gradients
from megatron_lite.training.runtime import Runtime
from megatron_lite.training.trainer import forward_backward

pytestmark = pytest.mark.slow

VOCAB, SEQ, EOD = 200, 16, 0  # 200: padded to 256, so vocabulary padding is exercised
TOL = dict(atol=1e-5, rtol=1e-5)


def make_config(arch: str, num_layers: int, mbs: int, **parallel) -> Config:
    model = tiny_model_config(
        arch,
        vocab_size=VOCAB,
        intermediate_size=64,
        num_layers=num_layers,
        tie_embeddings=parallel.pop("tie", False),
    )
    cfg = Config(
        model=model,
        parallel=ParallelConfig(**parallel),
        data=DataConfig(mock=True, seq_length=SEQ),
        training=TrainingConfig(micro_batch_size=mbs),
    )
    return cfg.validate()


def global_samples(num: int) -> torch.Tensor:
    """``[num, SEQ + 1]`` token rows with EOD tokens, so documents are packed."""
    gen = torch.Generator().manual_seed(321)
    tokens = torch.randint(1, VOCAB, (num, SEQ + 1), generator=gen)
    tokens[torch.rand(num, SEQ + 1, generator=gen) < 0.15] = EOD
    return tokens


def microbatches(samples: torch.Tensor, num: int, rows: slice | None = None) -> list:
    """``num`` microbatches of ``samples`` (optionally each microbatch's ``rows`` only)."""
    out = []
    for chunk in samples.chunk(num):
        chunk = chunk if rows is None else chunk[rows]
        out.append(make_batch(chunk, EOD, True, True, True))
    return out


def reference(cfg: Config, mbs_list: list) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """The single-process model's gradients on the global batch (trainer's loss normalisation)."""
    ref = build_model(cfg.model, "cpu", seed=0)
    num_tokens = float(sum(b.loss_mask.sum() for b in mbs_list))
    totals = forward_backward(ref, mbs_list, Runtime(torch.device("cpu"), "fp32", None), 1.0 / num_tokens)
    return ref, totals, num_tokens


def build_stage(cfg: Config, dims: ParallelDims, ref: torch.nn.Module) -> torch.nn.Module:
    """This rank's stage with the reference weights."""
    pre, post = stage_roles(dims.local.pp, dims.pp)
    layer_ids = stage_layer_ids(cfg, dims.local.pp)
    model = build_model(cfg.model, "meta", layer_ids=layer_ids, pre_process=pre, post_process=post)
    parallelize(model, dims, cfg.parallel)
    materialize_local(model, dims, seed=7)
    load_full_state_dict(model, ref.state_dict(), dims)
    return model


def check_layout(world: int, arch: str, num_layers: int, schedules: list[str], num_mb: int, **par) -> None:
    """One model layout on the current process group, every schedule in ``schedules``."""
    mbs = par.pop("mbs", 1)
    cfg = make_config(arch, num_layers, mbs, **par)
    dims = ParallelDims.from_config(cfg.parallel, world)
    dims.create_groups()
    c = dims.local
    samples = global_samples(num_mb * mbs * dims.dp)
    ref, ref_totals, num_tokens = reference(cfg, microbatches(samples, num_mb))
    local_mbs = microbatches(samples, num_mb, slice(c.dp * mbs, (c.dp + 1) * mbs))
    model = build_stage(cfg, dims, ref)
    chunks = model_chunks(model, cfg, c.pp)
    assert sum(p.numel() for ch in chunks for p in ch.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
    for layer in model.moe_layers():
        layer.aux_loss_scale = 1.0 / num_mb
    runtime = Runtime(torch.device("cpu"), "fp32", dims, distributed=True)
    group = dims.group("pp")
    warm_up(group, "cpu")
    shape = activation_shape(cfg, dims.tp)

    def loss_fn(logits, mb):
        loss_sum = masked_loss_sum(logits, mb.labels, mb.loss_mask, model)
        return loss_sum / num_tokens, loss_sum.detach()

    for schedule in schedules:
        tag = f"{arch} {schedule} pp={dims.pp} {par} M={num_mb}"
        model.zero_grad(set_to_none=True)
        actions = build_schedule(schedule, dims.pp, cfg.parallel.virtual_pipeline, num_mb)[c.pp]
        totals = PipelineExecutor(actions, chunks, group, shape, torch.float32, "cpu").run(local_mbs, loss_fn)
        reduce_gradients(model, runtime)
        dist.all_reduce(totals[0], group=dims.group("dp"))
        torch.testing.assert_close(totals, ref_totals, **TOL, msg=lambda m, tag=tag: f"{tag}: totals {m}")
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            want = shard_tensor(ref_params[name].grad, name, cfg.model, c)
            torch.testing.assert_close(
                p.grad, want, **TOL, msg=lambda m, t=tag, n=name: f"{t}: grad {n}: {m}"
            )
    # Forward only (evaluation): the same loss, no graph kept.
    model.eval()
    actions = forward_only(dims.pp, cfg.parallel.virtual_pipeline, num_mb)[c.pp]
    totals = PipelineExecutor(actions, chunks, group, shape, torch.float32, "cpu").run(local_mbs, loss_fn)
    dist.all_reduce(totals[0], group=dims.group("dp"))
    torch.testing.assert_close(totals[0], ref_totals[0], **TOL)
    model.train()
    dims.destroy_groups()


ONE_CHUNK = ["gpipe", "1f1b", "interleaved", "breadth-first"]
LOOPED = ["interleaved", "breadth-first"]


def _pp2_body(rank, world):
    check_layout(world, "mistral", 4, ONE_CHUNK, 3, pipeline=2, mbs=2)
    check_layout(world, "mistral", 4, LOOPED, 4, pipeline=2, virtual_pipeline=2)
    check_layout(world, "mistral", 4, ["1f1b"], 2, pipeline=2, tie=True)  # tied embeddings
    check_layout(world, "mistral", 4, LOOPED, 2, pipeline=2, virtual_pipeline=2, tie=True)
    check_layout(world, "mistral", 5, ["1f1b"], 3, pipeline=2, num_layers_in_first_stage=2)  # uneven
    check_layout(world, "mixtral", 4, ["1f1b"], 2, pipeline=2)
    check_layout(world, "mixtral", 4, LOOPED, 2, pipeline=2, virtual_pipeline=2)


def _pp4_body(rank, world):
    check_layout(world, "mistral", 4, ONE_CHUNK, 4, pipeline=4)
    check_layout(world, "mistral", 8, LOOPED, 4, pipeline=4, virtual_pipeline=2, tie=True)
    check_layout(world, "mistral", 8, ["breadth-first"], 3, pipeline=4, virtual_pipeline=2)  # M < pp
    check_layout(
        world, "mistral", 8, ["gpipe"], 2, pipeline=4, num_layers_in_first_stage=1, num_layers_in_last_stage=3
    )


def _composed_body(rank, world):
    # tp=2 (sequence parallel) x dp=2 (ep=2 inside) x pp=2, two chunks per rank, Mixtral.
    par = dict(tensor=2, sequence_parallel=True, expert=2, pipeline=2, virtual_pipeline=2, mbs=2)
    check_layout(world, "mixtral", 4, ["interleaved"], 2, **par, tie=True)


def test_pp2_every_schedule_matches_single_process():
    run_distributed(_pp2_body, 2)


def test_pp4_every_schedule_matches_single_process():
    run_distributed(_pp4_body, 4)


def test_tp2_pp2_ep2_mixtral_eight_ranks():
    run_distributed(_composed_body, 8)


def test_stage_output_is_released_once_sent():
    """The executor keeps a 0-d anchor, not the [b, s, h] output: its storage can be freed after
    the send, and the received gradient still reaches the stage's parameters."""
    import gc
    import weakref

    from megatron_lite.pipeline.executor import _GradSlot, _StageBoundary

    x = torch.randn(2, 4, 8, requires_grad=True)
    out = x * 3  # [b, s, h]
    slot = _GradSlot()
    anchor = _StageBoundary.apply(out, slot)
    alive = weakref.ref(out)  # torch keeps the Python object alive while C++ still holds the tensor
    del out
    gc.collect()
    assert anchor.shape == () and alive() is None
    received = torch.randn(2, 4, 8, dtype=torch.float64)  # may arrive in another transfer dtype
    slot.grad = received
    torch.autograd.backward(anchor)
    torch.testing.assert_close(x.grad, 3 * received.float())
    assert slot.grad is None  # handed over, not kept

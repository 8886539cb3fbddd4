"""Bytes per parameter of each rank's training state, by category, for several layouts (CPU).

Builds the model as training does (meta device, parallelized, local shards materialized in fp32,
then ``build_data_parallel``: gradient buffers, optimizer, cast to the compute dtype), runs one
optimizer step on zero gradients so AdamW creates its states, and counts the bytes of distinct
tensor storages (``untyped_storage().data_ptr()`` de-duplicated) in four categories:

* weights: the model's parameters;
* main grads: the fp32 gradient buffers (or, without them, the parameters' ``.grad``);
* main params: fp32 main copies owned by the optimizer (0 when they are views of the weights);
* optimizer states: the AdamW moments (and step counters).

Each is divided by the number of parameter elements on the rank. Every layout runs on real gloo
processes (world size = tp * pp * dp). Megatron's distributed optimizer under bf16 needs
2 + 4 + 12/dp bytes per parameter; the previous recipe (fp32 weights, ``--precision fp32``) needs
4 + 4 + 8/dp.

    python benchmarks/bench_memory.py                       # ~100M Mistral + small Mixtral, bf16
    python benchmarks/bench_memory.py --precision fp32      # the old recipe, same layouts
    python benchmarks/bench_memory.py --tiny --layouts dp1  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.config import load_config
from megatron_lite.training.distributed_optimizer import build_data_parallel
from megatron_lite.training.model_setup import build_local_model
from megatron_lite.training.runtime import check_run_config, init_runtime

MODELS = {
    # ~112M parameters: 10 layers of hidden 768 (GQA 12/4 heads), untied 32000-token vocabulary.
    "mistral-100m": [
        *("--model.hidden_size", "768", "--model.intermediate_size", "2048", "--model.num_layers", "10"),
        *("--model.num_attention_heads", "12", "--model.num_kv_heads", "4", "--model.vocab_size", "32000"),
    ],
    # ~29M parameters, 8 experts of FFN 512 in 4 layers of hidden 256.
    "mixtral-small": [
        *("--model.arch", "mixtral", "--model.num_experts", "8", "--model.hidden_size", "256"),
        *("--model.intermediate_size", "512", "--model.num_layers", "4", "--model.vocab_size", "32000"),
        *("--model.num_attention_heads", "8", "--model.num_kv_heads", "4"),
    ],
    "tiny": [
        *("--model.hidden_size", "64", "--model.intermediate_size", "128", "--model.num_layers", "4"),
        *("--model.num_attention_heads", "4", "--model.num_kv_heads", "2", "--model.vocab_size", "256"),
    ],
}
def _pipelined(stage: int) -> list[str]:
    """Breadth-first pp 2 x vpp 2 with the distributed optimizer at ZeRO ``stage``."""
    name = {1: "optimizer", 2: "gradients", 3: "parameters"}[stage]
    return [
        *("--parallel.pipeline", "2", "--parallel.virtual_pipeline", "2", "--parallel.schedule"),
        *("breadth-first", "--parallel.distributed_optimizer", "true"),
        *("--parallel.data_parallel_sharding", name),
        *("--model.num_layers", "8"),  # 2 per virtual stage (mistral-100m has 10)
    ]


# name -> (world size, overrides)
LAYOUTS = {
    **{f"dp{d}": (d, []) for d in (1, 2, 4, 8)},
    **{f"dp{d}_zero1": (d, ["--parallel.distributed_optimizer", "true"]) for d in (1, 2, 4, 8)},
    "tp2_zero1": (2, ["--parallel.tensor", "2", "--parallel.distributed_optimizer", "true"]),
    "pp2_zero1": (2, ["--parallel.pipeline", "2", "--parallel.distributed_optimizer", "true"]),
    # ZeRO stages 1-3 (parallel.data_parallel_sharding) under breadth-first pp 2 x vpp 2.
    **{
        f"pp2_dp{d}_zero{z}": (2 * d, _pipelined(z))
        for d in (2, 4)
        for z in (1, 2, 3)
    },
}
CATEGORIES = ("weights", "main_grads", "main_params", "optim_states")
# Not summed into the total: ZeRO-3's full weights of the largest chunk of the rank, and of its two
# largest (the one computing and the one prefetched): what the executor holds gathered at once.
WORKING_SETS = ("gathered_1_chunk", "gathered_2_chunks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mistral-100m", "mixtral-small"], choices=sorted(MODELS))
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--tiny", action="store_true", help="the tiny model only (smoke test)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = ["tiny"]
    return args


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage among ``tensors``."""
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def measure(model, optimizer, grad_sync) -> dict[str, float]:
    """Bytes per local parameter element of each category (see the module docstring)."""
    params = list(model.parameters())
    buffers = grad_sync.buffers if grad_sync is not None else []
    weights = _storages([*params, *(getattr(b, "param_shard", None) for b in buffers)])
    if grad_sync is not None:
        grads = _storages([b.data for b in buffers] + [getattr(b, "grad_shard", None) for b in buffers])
    else:
        grads = _storages(p.grad for p in params)
    mains = getattr(optimizer, "main_params", [])
    main_params = {k: v for k, v in _storages(mains).items() if k not in weights}
    inner = getattr(optimizer, "optimizer", optimizer)
    states = _storages(t for s in inner.state.values() for t in s.values() if torch.is_tensor(t))
    numel = sum(p.numel() for p in params)
    got = [weights, grads, main_params, states]
    chunk_bytes: dict[int, int] = {}
    for b in buffers:
        if getattr(b, "param_shard", None) is not None:
            nbytes = b.param_data.numel() * b.param_data.element_size()
            chunk_bytes[b.chunk] = chunk_bytes.get(b.chunk, 0) + nbytes
    largest = sorted(chunk_bytes.values())
    return {
        "params": numel,
        **{c: sum(s.values()) / numel for c, s in zip(CATEGORIES, got)},
        WORKING_SETS[0]: sum(largest[-1:]) / numel,
        WORKING_SETS[1]: sum(largest[-2:]) / numel,
    }


def _rank_body(
    rank: int, world: int, port: int, model_flags: list[str], layout_flags: list[str], precision, queue
):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        flags = [*model_flags, *layout_flags, "--training.precision", precision, "--data.mock", "true"]
        flags += [
            "--data.seq_length",
            "64",
            "--training.micro_batch_size",
            "1",
            "--training.train_iters",
            "10",
        ]
        cfg = load_config(None, flags)
        check_run_config(cfg, world)
        runtime = init_runtime(cfg)
        model = build_local_model(cfg, runtime)
        grad_sync, optimizer = build_data_parallel(model, cfg, runtime.dims, runtime.precision)
        if grad_sync is None:  # plain fp32 AdamW: the gradients backward would allocate
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        if grad_sync is not None:  # one step's protocol: ZeRO-2/3 keep only the reduced shard
            grad_sync.start_step(1)
            grad_sync.finish_grad_sync()
        optimizer.step()  # zero gradients: creates the AdamW states, changes nothing that matters
        for buffer in getattr(grad_sync, "buffers", []):
            if getattr(buffer, "param_shard", None) is not None:
                buffer.release()  # ZeRO-3 at rest: the executor releases each chunk after its run
        queue.put((rank, measure(model, optimizer, grad_sync)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_layout(model_flags: list[str], layout: str, precision: str) -> list[dict]:
    """Measure every rank of ``layout``; -> one row per rank."""
    world, layout_flags = LAYOUTS[layout]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_rank_body, args=(r, world, port, model_flags, layout_flags, precision, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"layout {layout}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    rows = sorted(queue.get() for _ in range(world))
    return [{"rank": r, **m} for r, m in rows]


def target(layout: str, precision: str) -> float:
    """Megatron's bytes per parameter for this layout and precision (dp from the world size)."""
    world, flags = LAYOUTS[layout]
    dp = world if layout.startswith("dp") else int(layout.split("_")[1][2:]) if "_dp" in layout else 1
    zero1 = "--parallel.distributed_optimizer" in flags
    stage = int(layout[-1]) if zero1 and layout[-1].isdigit() else 1
    weights, grads, states = (4, 4, 8) if precision == "fp32" else (2, 4, 12)
    if stage == 3 and precision == "fp32":
        states = 12  # ZeRO-3 keeps an fp32 main copy even of fp32 weights
    shard = dp if zero1 else 1
    return weights / (shard if stage >= 3 else 1) + grads / (shard if stage >= 2 else 1) + states / shard


def main(argv: list[str] | None = None) -> None:
    """Print one line per (model, layout, rank) and a summary of the worst rank per layout."""
    args = parse_args(argv)
    rows = []
    print(f"precision {args.precision}; bytes per local parameter: " + " + ".join(CATEGORIES))
    header = f"{'model':14s} {'layout':10s} rank {'params':>11s} " + " ".join(f"{c:>12s}" for c in CATEGORIES)
    print(header + f" {'total':>7s} {'target':>7s} " + " ".join(f"{w:>17s}" for w in WORKING_SETS))
    for model in args.models:
        for layout in args.layouts:
            for row in run_layout(MODELS[model], layout, args.precision):
                total = sum(row[c] for c in CATEGORIES)
                want = target(layout, args.precision)
                row.update(model=model, layout=layout, total=total, target=want, precision=args.precision)
                rows.append(row)
                cells = " ".join(f"{row[c]:12.3f}" for c in CATEGORIES)
                lead = f"{model:14s} {layout:10s} {row['rank']:4d} {row['params']:11,d}"
                sets = " ".join(f"{row[w]:17.3f}" for w in WORKING_SETS)
                print(f"{lead} {cells} {total:7.3f} {want:7.3f} {sets}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

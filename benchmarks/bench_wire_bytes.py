"""Bytes on the wires of one training step, by payload and collective, fp32 vs bf16 training.

Spawns gloo ranks on this machine (CPU), builds a tiny Mixtral in a tp2 + SP x pp2 x dp2 layout
with ep2 and the distributed optimizer (8 ranks; other layouts via flags), trains one step, then
records the second one with ``parallel.comm.CommRecorder`` and prints the bytes summed over all
ranks for each (payload, collective, dtype), once per precision. Activations, the MoE dispatch
and the parameter all-gather halve under bf16; the main-gradient reduction stays fp32 unless
``--grad-reduce-dtype bf16``.

    python benchmarks/bench_wire_bytes.py [--world 8] [--layout "--parallel.tensor 2 ..."]
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    *("--model.arch", "mixtral", "--model.num_experts", "4", "--model.vocab_size", "256"),
    *("--model.hidden_size", "64", "--model.intermediate_size", "128", "--model.num_layers", "4"),
    *("--model.num_attention_heads", "4", "--model.num_kv_heads", "2", "--model.tie_embeddings", "true"),
    *("--data.mock", "true", "--data.seq_length", "32", "--training.micro_batch_size", "2"),
    *("--training.global_batch_size", "8", "--training.train_iters", "2", "--logging.log_interval", "1000"),
]
LAYOUT = (
    "--parallel.tensor 2 --parallel.sequence_parallel true --parallel.pipeline 2 --parallel.expert 2 "
    "--parallel.distributed_optimizer true --parallel.overlap_grad_reduce true "
    "--parallel.overlap_param_gather true"
)


def _step_bytes(overrides: list[str], world: int) -> Counter:
    from megatron_lite.config import load_config
    from megatron_lite.parallel import comm
    from megatron_lite.training.runtime import check_run_config, init_runtime
    from megatron_lite.training.setup import setup_training

    cfg = load_config(None, overrides)
    check_run_config(cfg, world)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    trainer.train_step(trainer.train_stream.next())  # step 1 leaves the parameter gather in flight
    with comm.CommRecorder() as rec:
        trainer.train_step(trainer.train_stream.next())
    trainer.runtime.dims.destroy_groups()
    return rec.summary()


def _worker(rank: int, world: int, port: int, layout: list[str], reduce_dtype: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = {}
    for precision in ("fp32", "bf16"):
        extra = ["--parallel.grad_reduce_dtype", reduce_dtype] if precision == "bf16" else []
        summary = _step_bytes([*MODEL, *layout, "--training.precision", precision, *extra], world)
        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        rows[precision] = sum(gathered, Counter())
    if rank == 0:
        _print(rows)
    dist.destroy_process_group()


def _print(rows: dict) -> None:
    keys = sorted({(tag, kind) for c in rows.values() for kind, tag, _ in c})
    print(f"{'payload':10} {'collective':15} {'fp32 step':>22} {'bf16 step':>22}")
    for tag, kind in keys:
        cells = []
        for precision in ("fp32", "bf16"):
            found = [(d, n) for (k, t, d), n in rows[precision].items() if (t, k) == (tag, kind)]
            cells.append(", ".join(f"{n / 1024:.1f} KiB {d}" for d, n in sorted(found)) or "-")
        print(f"{tag:10} {kind:15} {cells[0]:>22} {cells[1]:>22}")
    for precision in ("fp32", "bf16"):
        print(f"total {precision}: {sum(rows[precision].values()) / 1024:.1f} KiB (all ranks, one step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layout", default=LAYOUT, help="parallel flags (one string)")
    p.add_argument("--grad-reduce-dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    mp.spawn(
        _worker, args=(args.world, port, shlex.split(args.layout), args.grad_reduce_dtype), nprocs=args.world
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""Activation memory per rank with context parallelism (cp 1, 2, 4) on CPU, gloo processes.

A small Mistral (2 layers, hidden 64, 4 heads, 2 KV heads, window off) runs one forward+backward
on one sequence of ``--seq`` tokens (16k by default), split over ``cp`` ranks as training splits
it (chunks i and 2cp-1-i, K/V all-gathered per layer). Each rank reports

* ``saved``: bytes of the tensors autograd keeps for backward at the end of the forward (the
  activations proper; counted once per storage with ``saved_tensors_hooks``), and
* ``peak``: the rise of the process's peak RSS (``ru_maxrss``) over forward+backward, which also
  counts transient buffers (the attention mask, the gathered K/V, backward's temporaries).

The ratio to cp 1 should be close to 1/cp: every per-token tensor is s/cp long, and the mask
``[s/cp, s]`` falls as 1/cp too; only the gathered K/V (one layer's, ``2 b s nkv hd``) does not.
cp 1 runs the same code path on one rank (identity gather, ``[s, s]`` additive mask, which a run
without cp also builds for packed documents or windows); a plain causal run without cp needs no
mask on CPU, so against that baseline the mask (``4 s^2 / cp`` bytes here) is the price of cp.

Communication per layer and rank (formula printed with the numbers): the forward all-gather of
K and V receives ``(cp-1)/cp * b * s * 2 * nkv/tp * hd * bytes`` and the backward reduce-scatter
of their gradients sends as much, so ``2 (cp-1)/cp * b s 2 nkv hd / tp * bytes`` per layer
(ring attention moves the same K/V volume, in cp-1 steps).

Usage: ``python benchmarks/bench_context_parallel.py [--seq 16384] [--cps 1 2 4]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_lite.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_lite.models import build_model  # noqa: E402
from megatron_lite.parallel import ParallelDims, loss_fn, parallelize  # noqa: E402
from megatron_lite.parallel.context import ContextParallel, split_sequence  # noqa: E402


def _model_config(seq: int) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        max_position_embeddings=seq,
        sliding_window=None,
    )
    cfg.validate()
    return cfg


def _saved_bytes_hooks():
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    return storages, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _measure(rank: int, cp: int, seq: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if cp > 1:
        dist.init_process_group("gloo", rank=rank, world_size=cp)
    cfg = _model_config(seq)
    pcfg = ParallelConfig(context=cp)
    dims = ParallelDims.from_config(pcfg, cp)
    dims.create_groups()
    model = parallelize(build_model(cfg, "cpu", seed=0), dims, pcfg)
    if cp == 1:  # the same algorithm on one rank (identity gather, [s, s] mask): a like-for-like base
        model.context_parallel = ContextParallel(None, 0, 1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=gen)
    positions = torch.arange(seq).unsqueeze(0)
    inputs, labels, pos = (
        split_sequence(t, dims.local.cp, cp) for t in (tokens[:, :-1], tokens[:, 1:], positions)
    )
    mask = torch.ones(labels.shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    storages, hooks = _saved_bytes_hooks()
    with hooks:
        logits = model(inputs, pos)
        loss = loss_fn(logits, labels, mask, dims, cfg.vocab_size, num_tokens=float(seq))
    saved = sum(storages.values())
    loss.backward()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    out.put((cp, rank, saved, peak))
    if cp > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(cp: int, seq: int) -> list[tuple[int, int, int, int]]:
    """Spawn ``cp`` processes; return ``(cp, rank, saved bytes, peak RSS rise)`` of each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_measure, args=(r, cp, seq, port, out)) for r in range(cp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"cp {cp}: a rank exited with {p.exitcode}")
    return sorted(out.get() for _ in procs)


def comm_bytes_per_layer(
    cp: int, seq: int, nkv: int, hd: int, tp: int = 1, b: int = 1, dtype_bytes: int = 2
) -> float:
    """Bytes one rank receives (forward all-gather) plus sends (backward reduce-scatter) per layer."""
    return 2 * (cp - 1) / cp * b * seq * 2 * (nkv / tp) * hd * dtype_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = None
    print(f"seq {args.seq}, 2 layers, hidden 64, 4 heads / 2 KV heads, fp32, one sequence")
    print("cp | max saved activations / rank (MiB) | ratio | max peak RSS rise / rank (MiB) | ratio")
    for cp in args.cps:
        rows = run(cp, args.seq)
        saved, peak = max(r[2] for r in rows), max(r[3] for r in rows)
        base = base or (saved, peak)
        print(
            f"{cp} | {saved / 2**20:.1f} | {saved / base[0]:.3f} | {peak / 2**20:.1f} | {peak / base[1]:.3f}",
            flush=True,
        )
    mib = comm_bytes_per_layer(4, 32768, 8, 128) / 2**20
    print(
        "comm per layer and rank = 2 (cp-1)/cp * b * s * 2 * nkv/tp * hd * bytes "
        f"(Mistral 7B, s 32768, cp 4, tp 1, bf16: {mib:.0f} MiB)"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Breadth-first vs interleaved with sharded data parallelism, simulated on the paper's setting.

Reproduces, with ``megatron_lite.pipeline.simulator`` and its data-parallel comm model
(``pipeline/dp_comm.py``), the qualitative finding of Lamy-Poirier, "Breadth-First Pipeline
Parallelism" (arXiv 2211.05953): for a 52B model at a small batch per GPU, the looped
breadth-first schedule with fully sharded data parallelism (ZeRO-3) is ahead of Megatron's
interleaved (depth-first) schedule, and the gap closes as the batch per GPU grows.

Pure Python, a few seconds on a CPU; prints a markdown table (``--json`` for the raw numbers).
Every number below is an assumption of this script, stated so it can be changed:

* Model: 52B GPT-style decoder, 64 layers, hidden 8192 (12 * 64 * 8192^2 = 51.5 B weights in the
  layers), sequence 2048, microbatch 1 sequence.
* GPUs: A100, 312 TFLOP/s bf16 peak at an assumed 50 % utilisation in the layers; backward = 2x
  forward (no activation recomputation).
* Layout: tensor parallel 8 inside a DGX node (NVLink), pipeline 8 with 8 chunks per rank (one
  layer per chunk, the paper's looping), data parallel 16 across nodes: 1024 GPUs.
* Network: each GPU has its own 200 Gb/s InfiniBand link (DGX A100): 25 GB/s per rank for ring
  collectives, 10 us per ring step; pipeline point-to-point of one [2048, 1, 8192] bf16
  activation / tp over the same link.
* ZeRO-3 gathers bf16 weights and reduce-scatters bf16 gradients, one chunk at a time; ZeRO-1
  reduce-scatters the same gradients and all-gathers the bf16 weights after the optimizer step,
  not overlapped. "reduce not overlapped": every reduce-scatter after the last backward, as
  Megatron-LM ran when the paper measured it. Optimizer step time is left out (the same for
  every row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.pipeline.dp_comm import ZERO_STAGES, DataParallelComm  # noqa: E402
from megatron_lite.pipeline.schedules import build_schedule  # noqa: E402
from megatron_lite.pipeline.simulator import simulate  # noqa: E402

SETTING = {
    "layers": 64,
    "hidden": 8192,
    "seq": 2048,
    "microbatch": 1,
    "tp": 8,
    "pp": 8,
    "vpp": 8,
    "dp": 16,
    "peak_tflops": 312.0,
    "utilisation": 0.5,
    "bandwidth_gbs": 25.0,
    "latency_us": 10.0,
}


def stage_times_ms(s: dict) -> tuple[float, float, float]:
    """(t_fwd, t_bwd) of one pipeline stage for one microbatch, and the p2p time, in ms."""
    h, seq, tokens = s["hidden"], s["seq"], s["seq"] * s["microbatch"]
    layer_params = 12 * h * h
    # Matmuls 2 * params * tokens, attention scores and context 4 * seq * h per token (causal
    # masking not exploited, as in most kernels' FLOP counts).
    layer_flops = 2 * layer_params * tokens + 4 * seq * h * tokens
    stage_flops = layer_flops * s["layers"] / s["pp"] / s["tp"]
    t_fwd = stage_flops / (s["peak_tflops"] * 1e12 * s["utilisation"]) * 1e3
    t_p2p = 2 * tokens * h / s["tp"] / (s["bandwidth_gbs"] * 1e9) * 1e3
    return t_fwd, 2 * t_fwd, t_p2p


def dp_comm(s: dict, zero: int, overlap_reduce: bool = True) -> DataParallelComm:
    """The setting's data-parallel comm model (ms, bytes)."""
    chunk_params = 12 * s["hidden"] ** 2 * s["layers"] / (s["pp"] * s["vpp"]) / s["tp"]
    return DataParallelComm(
        dp=s["dp"],
        zero=zero,
        param_bytes_per_chunk=2 * chunk_params,
        bandwidth=s["bandwidth_gbs"] * 1e6,
        latency=s["latency_us"] / 1e3,
        overlap_reduce=overlap_reduce,
    )


def run(s: dict, microbatches: list[int]) -> list[dict]:
    """Step time per (microbatches, schedule, ZeRO stage) and the throughput ratio."""
    t_fwd, t_bwd, t_p2p = stage_times_ms(s)
    rows = []
    for m in microbatches:
        row = {"microbatches": m, "batch_per_gpu": m * s["microbatch"] / (s["tp"] * s["pp"])}
        ideal = None
        for name in ("breadth-first", "interleaved"):
            schedule = build_schedule(name, s["pp"], s["vpp"], m)
            if ideal is None:
                ideal = m * (t_fwd + t_bwd)  # no bubble, no exposed communication
            variants = [(f"zero{z}", dp_comm(s, z)) for z in ZERO_STAGES]
            if name == "interleaved":  # Megatron-LM as the paper measured it
                variants.append(("zero1 no overlap", dp_comm(s, 1, overlap_reduce=False)))
            for key, comm in variants:
                r = simulate(schedule, t_fwd, t_bwd, t_p2p, vpp=s["vpp"], dp_comm=comm)
                gathers = max(sum(e.kind == "all_gather" for e in ev) for ev in r.dp_events)
                row[f"{name} {key}"] = {"step_ms": r.step_time, "all_gathers": gathers}
        row["compute_ms"] = ideal
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """The README table: step times, and breadth-first ZeRO-3's throughput gain over interleaved."""
    out = [
        "| batch/GPU | micro-batches | BF ZeRO-3 | IL ZeRO-3 | IL ZeRO-1 | IL ZeRO-1, reduce not overlapped "
        "| BF ZeRO-1 | BF-3 gain over IL-3 | over best IL | over IL-1 not overlapped "
        "| ZeRO-3 gathers/rank BF, IL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bf3, il3, il1 = (
            r[k]["step_ms"] for k in ("breadth-first zero3", "interleaved zero3", "interleaved zero1")
        )
        il1_late, bf1 = r["interleaved zero1 no overlap"]["step_ms"], r["breadth-first zero1"]["step_ms"]
        times = " | ".join(f"{t:.0f} ms" for t in (bf3, il3, il1, il1_late, bf1))
        gains = " | ".join(_gain(t, bf3) for t in (il3, min(il3, il1), il1_late))
        gathers = f"{r['breadth-first zero3']['all_gathers']}, {r['interleaved zero3']['all_gathers']}"
        out.append(f"| {r['batch_per_gpu']:g} | {r['microbatches']} | {times} | {gains} | {gathers} |")
    return "\n".join(out)


def _gain(other_ms: float, bf_ms: float) -> str:
    """Breadth-first's throughput gain (same batch, so the step-time ratio), in percent."""
    return f"{100 * (other_ms / bf_ms - 1):+.1f} %"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--microbatches", default="8,16,32,64,128", help="comma-separated, multiples of pp")
    p.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    for key, value in SETTING.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    s = {key: getattr(args, key) for key in SETTING}
    rows = run(s, [int(x) for x in args.microbatches.split(",")])
    if args.json:
        print(json.dumps({"setting": s, "rows": rows}))
        return 0
    t_fwd, t_bwd, t_p2p = stage_times_ms(s)
    print(
        f"stage forward {t_fwd:.2f} ms, backward {t_bwd:.2f} ms per microbatch; p2p {t_p2p:.3f} ms; "
        f"chunk all-gather {dp_comm(s, 3).t_gather:.2f} ms"
    )
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

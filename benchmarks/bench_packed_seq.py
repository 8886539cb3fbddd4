"""Benchmark packed_seq_metadata (compiled kernel vs the pure-torch reference).

Builds packed rows of documents with lengths drawn from a geometric distribution (mean
``--mean-doc``), then times the op and compares it with a memory floor: the bytes it must move
(read tokens, write position ids, loss mask and cu_seqlens) over the measured device-to-device
copy bandwidth. The time includes the one device-to-host sync that returning ``max_seqlen`` as a
Python int requires.

    python benchmarks/bench_packed_seq.py                          # GPU, 16 x 8192
    python benchmarks/bench_packed_seq.py --device cpu --batch 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_lite import ops
from megatron_lite.ops.benchmark_utils import Row, copy_bandwidth_gbs, print_table, time_ms

EOD = 2  # Mistral's </s>


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="rows (b)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per row (s)")
    p.add_argument("--mean-doc", type=float, default=600.0, help="mean document length in tokens")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def packed_tokens(batch: int, seq_len: int, mean_doc: float, device: torch.device) -> torch.Tensor:
    """Random tokens in [3, 32000) with EOD placed at geometric intervals (vectorised)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32000, (batch, seq_len), generator=gen)
    eod = torch.rand(batch, seq_len, generator=gen) < 1.0 / max(mean_doc, 1.0)
    tokens[eod] = EOD
    return tokens.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_packed_seq: no CUDA device; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    tokens = packed_tokens(args.batch, args.seq_len, args.mean_doc, device)
    bw = copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    with ops.use_backend("reference"):
        cu_seqlens, max_seqlen, _, _ = ops.packed_seq_metadata(tokens, EOD)
    n = tokens.numel()
    nbytes = n * 8 + n * 8 + n * 4 + cu_seqlens.numel() * 4  # tokens, position ids, mask, cu_seqlens
    times = {}
    for face in ("compiled", "reference"):
        with ops.use_backend(face):
            times[face] = time_ms(
                lambda: ops.packed_seq_metadata(tokens, EOD), device, warmup=args.warmup, iters=args.iters
            )
    row = Row("packed_seq_metadata", times["compiled"], times["reference"], nbytes, bw)
    print(
        f"device {device}, copy bandwidth {bw:.0f} GB/s; b={args.batch} s={args.seq_len} "
        f"docs={cu_seqlens.numel() - 1} max_seqlen={max_seqlen}"
    )
    print_table([row])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "copy_gbs": round(bw, 1), "ops": [row.as_dict()]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark our Mixtral MoE layer against transformers' MixtralSparseMoeBlock, forward + backward.

Both layers get the same weights (router, stacked gate/up and down projections) and the same
input; the outputs are compared before timing, so a faster wrong layer cannot pass. Default shape
is one Mixtral 8x7B layer on a 16k-token microbatch (hidden 4096, FFN 14336, 8 experts, top-2,
bf16) on a GPU; issue target: ours at least 2x faster than transformers' block.

    python benchmarks/bench_moe_layer.py                                   # GPU, Mixtral shape
    python benchmarks/bench_moe_layer.py --device cpu --dtype fp32 --tokens 1024 --hidden 256 --ffn 512
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_lite.models.common.moe import MoE
from megatron_lite.ops.benchmark_utils import time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our ``MoE`` and transformers' block holding identical weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours = MoE(args.hidden, args.ffn, args.experts, args.topk, device=device, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    hf_cfg = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_local_experts=args.experts,
        num_experts_per_tok=args.topk,
        router_jitter_noise=0.0,
    )
    theirs = MixtralSparseMoeBlock(hf_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.w13)  # [E, 2F, H]: gate rows, then up rows
        theirs.experts.down_proj.copy_(ours.experts.w2)  # [E, H, F]
    return ours, theirs


def step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """A closure running forward + backward once (parameter grads accumulate; harmless here)."""

    def run():
        x.grad = None
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return run


def main(argv: list[str] | None = None) -> int:
    """Check agreement, time both layers, print (and optionally save) the result."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu (with small shapes) for a smoke run", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = build_pair(args)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
        b = b[0] if isinstance(b, tuple) else b
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if err > tol:
        print(f"outputs disagree: max relative error {err:.3g} > {tol}", file=sys.stderr)
        return 1
    ms_ours = time_ms(step(ours, x, grad), device, warmup=args.warmup, iters=args.iters)
    ms_theirs = time_ms(step(theirs, x, grad), device, warmup=args.warmup, iters=args.iters)
    flops = 3 * 2 * args.tokens * args.topk * 3 * args.hidden * args.ffn  # fwd + 2x bwd, 3 GEMMs
    result = {
        "shape": {k: getattr(args, k) for k in ("tokens", "hidden", "ffn", "experts", "topk", "dtype")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ours_ms": ms_ours,
        "transformers_ms": ms_theirs,
        "speedup": ms_theirs / ms_ours,
        "ours_tflops": flops / ms_ours / 1e9,
        "max_rel_err": err,
    }
    print(
        f"MoE layer fwd+bwd, {args.tokens} tokens, H={args.hidden}, F={args.ffn}, E={args.experts}, "
        f"k={args.topk}, {args.dtype}, {result['device']}:\n"
        f"  megatron_lite MoE        {ms_ours:9.2f} ms  ({result['ours_tflops']:.1f} TFLOP/s)\n"
        f"  transformers block       {ms_theirs:9.2f} ms\n"
        f"  speedup                  {result['speedup']:9.2f}x   (outputs agree to {err:.1e})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

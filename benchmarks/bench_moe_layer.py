"""Benchmark our Mixtral MoE layer against transformers' MixtralSparseMoeBlock, forward + backward.

Both layers get the same weights (router, stacked gate/up and down projections) and the same
input; the outputs are compared before timing, so a faster wrong layer cannot pass. transformers'
block runs its fastest experts implementation for the installed version (``grouped_mm``, torch's
grouped GEMM, in transformers 5.x; the standalone block would otherwise run its slow eager loop).
The two sides are timed in turns (A B A B ...) and the result is the median of the per-round
ratios with its spread, which a shared, noisy machine cannot skew towards one side.

    python benchmarks/bench_moe_layer.py                       # GPU, Mixtral 8x7B layer, 16k tokens, bf16
    python benchmarks/bench_moe_layer.py --device cpu --dtype fp32 --tokens 4096 --hidden 512 --ffn 1024
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_lite import ops
from megatron_lite.models.common.moe import MoE
from megatron_lite.ops.benchmark_utils import interleaved_ms, ratio_summary

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
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="rounds of (ours, theirs)")
    p.add_argument(
        "--hf-experts",
        default="auto",
        help="transformers' experts implementation: auto (its fastest here), grouped_mm, eager...",
    )
    p.add_argument(
        "--ops-backend",
        choices=("auto", "reference"),
        default="auto",
        help="reference: run our layer on the pure-torch ops (the per-expert loop of earlier versions)",
    )
    p.add_argument(
        "--cpu-clock",
        action="store_true",
        help="on CPU, time with process CPU time (use with OMP_NUM_THREADS=1 on a shared machine)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def fastest_hf_experts(requested: str) -> str:
    """transformers' experts implementation to compare with.

    ``auto`` follows transformers' own default for models (``get_correct_experts_implementation``):
    ``grouped_mm`` where this version registers it, else the eager loop. ``batched_mm`` is never
    the fastest for training (it materialises a weight matrix per routed token).
    """
    if requested != "auto":
        return requested
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # transformers 4.x: one implementation only
        return "eager"
    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "eager"


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """Our ``MoE`` and transformers' block holding identical weights, and the HF experts name."""
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
    experts = fastest_hf_experts(args.hf_experts)
    hf_cfg._experts_implementation = experts
    theirs = MixtralSparseMoeBlock(hf_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.w13)  # [E, 2F, H]: gate rows, then up rows
        theirs.experts.down_proj.copy_(ours.experts.w2)  # [E, H, F]
    return ours, theirs, experts


def step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """A closure running forward + backward once (parameter grads accumulate; harmless here)."""

    def run():
        x.grad = None
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return run


def main(argv: list[str] | None = None) -> int:
    """Check agreement, time both layers in turns, print (and optionally save) the result."""
    args = parse_args(argv)
    with ops.use_backend(args.ops_backend):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu (with small shapes) for a smoke run", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs, hf_experts = build_pair(args)
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
    times = interleaved_ms(
        {"ours": step(ours, x, grad), "theirs": step(theirs, x, grad)},
        device,
        warmup=args.warmup,
        iters=args.iters,
        cpu_clock=args.cpu_clock,
    )
    ratio = ratio_summary(times["ours"], times["theirs"])
    ms_ours = sorted(times["ours"])[len(times["ours"]) // 2]
    ms_theirs = sorted(times["theirs"])[len(times["theirs"]) // 2]
    flops = 3 * 2 * args.tokens * args.topk * 3 * args.hidden * args.ffn  # fwd + 2x bwd, 3 GEMMs
    result = {
        "shape": {k: getattr(args, k) for k in ("tokens", "hidden", "ffn", "experts", "topk", "dtype")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers_experts": hf_experts,
        "ops_backend": args.ops_backend,
        "ours_ms": ms_ours,
        "transformers_ms": ms_theirs,
        "speedup": ratio["median"],
        "speedup_spread": ratio,
        "rounds": args.iters,
        "clock": "process CPU time" if args.cpu_clock and device.type == "cpu" else "wall",
        "ours_tflops": flops / ms_ours / 1e9,
        "max_rel_err": err,
    }
    print(
        f"MoE layer fwd+bwd, {args.tokens} tokens, H={args.hidden}, F={args.ffn}, E={args.experts}, "
        f"k={args.topk}, {args.dtype}, {result['device']}, {args.iters} interleaved rounds:\n"
        f"  megatron_lite MoE                {ms_ours:9.2f} ms  ({result['ours_tflops']:.2f} TFLOP/s)\n"
        f"  transformers block ({hf_experts:<10})  {ms_theirs:9.2f} ms\n"
        f"  speedup (median of ratios)       {ratio['median']:9.2f}x  "
        f"(IQR {ratio['q1']:.2f}-{ratio['q3']:.2f}, range {ratio['min']:.2f}-{ratio['max']:.2f}; "
        f"outputs agree to {err:.1e})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

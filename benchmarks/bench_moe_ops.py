"""Benchmark the MoE routing ops (compiled kernels vs the pure-torch reference).

Default shape is one Mixtral 8x7B layer's routing for a 16k-token microbatch: hidden 4096,
FFN 14336, 8 experts, top-2, bf16. Each op is timed forward and forward+backward; the
bandwidth-bound ones are compared with a memory floor (bytes the op must move divided by the
measured device-to-device copy bandwidth). ``grouped_mm`` (the w1 projection, 4096 -> 14336)
is reported in TFLOP/s instead. The MoE *layer* against transformers: bench_moe_layer.py.

    python benchmarks/bench_moe_ops.py                      # GPU, default shape
    python benchmarks/bench_moe_ops.py --device cpu --tokens 512 --hidden 256 --ffn 512  # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from megatron_lite import ops
from megatron_lite.ops.benchmark_utils import Row, copy_bandwidth_gbs, print_table, synchronize, time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per microbatch (T)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (H)")
    p.add_argument("--ffn", type=int, default=14336, help="expert FFN size, for grouped_mm")
    p.add_argument("--experts", type=int, default=8, help="number of experts (E)")
    p.add_argument("--topk", type=int, default=2, help="experts per token (k)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--skip-grouped-mm", action="store_true", help="skip the grouped_mm timing")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def timed_pair(name: str, make: Callable[[], Callable[[], object]], nbytes: int, args, bw: float) -> Row:
    """Times the closure built by ``make`` under the compiled and the reference backend."""
    device = torch.device(args.device)
    times = {}
    for face in ("compiled", "reference"):
        with ops.use_backend(face):
            fn = make()
            times[face] = time_ms(fn, device, warmup=args.warmup, iters=args.iters)
    return Row(name, times["compiled"], times["reference"], nbytes, bw)


def routing_rows(args, bw: float) -> list[Row]:
    """Rows for top-k softmax, permute and unpermute, forward and forward+backward."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    T, H, E, k = args.tokens, args.hidden, args.experts, args.topk
    e = torch.finfo(dtype).bits // 8
    logits = torch.randn(T, E, device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype)
    with ops.use_backend("reference"):
        weights, indices, _ = ops.moe_topk_softmax(logits, k)
        permuted, row_map = ops.moe_permute(x, indices)
    g_w = torch.randn(T, k, device=device)
    g_p, g_x = torch.randn_like(permuted), torch.randn_like(x)
    logits_g, x_g = logits.detach().requires_grad_(), x.detach().requires_grad_()
    permuted_g, weights_g = permuted.detach().requires_grad_(), weights.detach().requires_grad_()

    topk_bytes = T * E * e + T * k * (4 + 8) + E * 8
    permute_bytes = T * H * e + T * k * H * e + T * k * 8 * 2  # x once, copies, indices + row_map
    unpermute_bytes = T * k * H * e + T * H * e + T * k * (4 + 8)
    unpermute_bwd_bytes = T * H * e + 2 * T * k * H * e + T * k * (4 + 4 + 8)  # grad, permuted, grad_p
    return [
        timed_pair("topk_softmax fwd", lambda: lambda: ops.moe_topk_softmax(logits, k), topk_bytes, args, bw),
        timed_pair(
            "topk_softmax fwd+bwd",
            lambda: _fwd_bwd(lambda: ops.moe_topk_softmax(logits_g, k)[0], [logits_g], g_w),
            2 * topk_bytes + T * E * e,
            args,
            bw,
        ),
        timed_pair("permute fwd", lambda: lambda: ops.moe_permute(x, indices), permute_bytes, args, bw),
        timed_pair(
            "permute fwd+bwd",
            lambda: _fwd_bwd(lambda: ops.moe_permute(x_g, indices)[0], [x_g], g_p),
            permute_bytes + T * k * H * e + T * H * e,
            args,
            bw,
        ),
        timed_pair(
            "unpermute fwd",
            lambda: lambda: ops.moe_unpermute(permuted, row_map, weights),
            unpermute_bytes,
            args,
            bw,
        ),
        timed_pair(
            "unpermute fwd+bwd",
            lambda: _fwd_bwd(
                lambda: ops.moe_unpermute(permuted_g, row_map, weights_g), [permuted_g, weights_g], g_x
            ),
            unpermute_bytes + unpermute_bwd_bytes,
            args,
            bw,
        ),
    ]


def _fwd_bwd(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    """A closure running ``forward`` and its backward w.r.t. ``inputs`` (grads discarded)."""
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def grouped_mm_report(args) -> dict[str, float]:
    """TFLOP/s of grouped_mm (fast face vs per-expert loop) for the w1 projection, fwd+bwd."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    T, k, E, H, F = args.tokens, args.topk, args.experts, args.hidden, args.ffn
    n = T * k
    counts = torch.full((E,), n // E, dtype=torch.int64)
    counts[0] += n - int(counts.sum())
    x = torch.randn(n, H, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(E, F, H, device=device, dtype=dtype) / H**0.5).requires_grad_()
    g = torch.randn(n, F, device=device, dtype=dtype)
    tpe = counts.to(device)
    flops = 3 * 2 * n * H * F  # forward + two backward GEMMs
    out = {}
    for face in ("auto", "reference"):
        with ops.use_backend(face):
            ms = time_ms(
                lambda: torch.autograd.grad(ops.grouped_mm(x, w, tpe), [x, w], g),
                device,
                warmup=args.warmup,
                iters=args.iters,
            )
        out[f"{face}_ms"] = round(ms, 3)
        out[f"{face}_tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_moe_ops: no CUDA device; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"copy bandwidth {bw:.0f} GB/s; T={args.tokens} H={args.hidden} E={args.experts} k={args.topk} "
        f"{args.dtype}"
    )
    rows = routing_rows(args, bw)
    synchronize(device)
    print_table(rows)
    result = {"config": vars(args), "copy_gbs": round(bw, 1), "ops": [r.as_dict() for r in rows]}
    if not args.skip_grouped_mm:
        result["grouped_mm_w1_fwd_bwd"] = gm = grouped_mm_report(args)
        print(
            f"grouped_mm w1 fwd+bwd: auto {gm['auto_ms']} ms ({gm['auto_tflops']} TFLOP/s), "
            f"loop {gm['reference_ms']} ms ({gm['reference_tflops']} TFLOP/s)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

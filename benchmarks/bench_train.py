"""Training-step throughput of our Mistral next to transformers' MistralForCausalLM on the same config.

Default: a ~1B Mistral (hidden 2048, 16 layers, 16 heads, 8 KV heads, FFN 5632, vocab 32000) at
sequence 4096, micro-batch 4, bf16 autocast over fp32 master weights (our training recipe, used
for both models), one GPU. One step = forward + backward + global-norm clip + fused AdamW. After
``--warmup`` steps, ``--iters`` steps are timed with CUDA events (wall clock on CPU). MFU uses the
FLOPs formula of DESIGN.md for both models (the same model, so the same useful work).

    python benchmarks/bench_train.py                    # GPU, both models
    python benchmarks/bench_train.py --tiny             # CPU smoke test of the script itself
    python benchmarks/bench_train.py --only ours --recompute --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_lite.config import ModelConfig, OptimizerConfig
from megatron_lite.data.batching import make_batch
from megatron_lite.models import build_model
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.parallelize import materialize_local
from megatron_lite.training import metrics
from megatron_lite.training.model_setup import apply_recompute, masked_loss_sum
from megatron_lite.training.optimizer import NormGroup, build_optimizer, clip_grads

BIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_layers=16,
    num_attention_heads=16,
    num_kv_heads=8,
    max_position_embeddings=4096,
)
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_attention_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU in fp32 (smoke test)")
    p.add_argument("--seq-length", type=int, default=None, help="default 4096 (32 with --tiny)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 4 (2 with --tiny)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 with --tiny)"
    )
    p.add_argument("--recompute", action="store_true", help="full activation recomputation (both models)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="benchmark one model only")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the per-device peak for MFU")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.seq_length = args.seq_length or (32 if args.tiny else 4096)
    args.micro_batch_size = args.micro_batch_size or (2 if args.tiny else 4)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """Our config for the benchmarked model (no sliding window, untied embeddings)."""
    base = dict(TINY if args.tiny else BIG)
    base["max_position_embeddings"] = max(base["max_position_embeddings"], args.seq_length)
    cfg = ModelConfig(arch="mistral", **base)
    cfg.validate()
    return cfg


def autocast(device: torch.device, precision: str):
    """The mixed-precision context both models run their forward under."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def setup_ours(cfg: ModelConfig, args, device: torch.device, tokens: torch.Tensor) -> Callable[[], float]:
    """Our model built the way the trainer builds it; returns a function running one training step."""
    dims = ParallelDims.build(1)
    dims.create_groups()
    model = build_model(cfg, "meta", dtype=torch.float32)
    materialize_local(model, dims, seed=1234, device=device)
    if args.recompute:
        apply_recompute(model, "full")
    opt = build_optimizer(model, OptimizerConfig(lr=1e-4))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(tokens, 0, False, False, False)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            logits = model(batch.tokens, position_ids=batch.position_ids)
        loss = masked_loss_sum(logits, batch.labels, batch.loss_mask, model) / batch.loss_mask.numel()
        loss.backward()
        clip_grads([NormGroup(params)], 1.0, device)
        opt.step()
        return float(loss.detach())

    return step


def setup_hf(cfg: ModelConfig, args, device: torch.device, tokens: torch.Tensor) -> Callable[[], float]:
    """transformers' MistralForCausalLM (SDPA attention) on the same config and recipe."""
    from transformers import MistralConfig, MistralForCausalLM

    hf_cfg = MistralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        sliding_window=None,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = MistralForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    model = model.to(device)
    if args.recompute:  # per-layer recomputation like ours; the method was renamed in transformers 5
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def time_steps(step: Callable[[], float], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per step for ``iters`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()  # float(loss) syncs the host once per step, as the trainer's logging does
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def run_one(name: str, setup, cfg: ModelConfig, args, device: torch.device) -> dict:
    """Build, time and free one model; returns its result row."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=gen)
    tokens = tokens.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = setup(cfg, args, device, tokens)
    times = time_steps(step, device, args.warmup, args.iters)
    seconds = statistics.median(times)
    peak = metrics.device_peak_tflops(device, args.peak_tflops)
    tok_s, tflops, mfu = metrics.throughput(
        args.micro_batch_size * args.seq_length,
        seconds,
        1,
        metrics.flops_per_token(cfg, args.seq_length),
        peak,
    )
    row = {
        "model": name,
        "ms_per_step": seconds * 1e3,
        "ms_min": min(times) * 1e3,
        "tokens_per_s": tok_s,
        "tflops": tflops,
        "mfu_percent": mfu,
        "mem_gib": metrics.memory_gib(device),
        "loss": step(),
    }
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per model."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("bench_train: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    cfg = model_config(args)
    print(
        f"# {metrics.total_params(cfg) / 1e6:.1f}M params, seq {args.seq_length}, micro-batch "
        f"{args.micro_batch_size}, {args.precision}, recompute {args.recompute}, "
        f"{metrics.flops_per_token(cfg, args.seq_length) / 1e9:.4g} GFLOP/token, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    rows = []
    for name, setup in (("megatron_lite", setup_ours), ("hf_mistral_sdpa", setup_hf)):
        if args.only and not name.startswith({"ours": "megatron", "hf": "hf"}[args.only]):
            continue
        row = run_one(name, setup, cfg, args, device)
        rows.append(row)
        mfu = "n/a" if row["mfu_percent"] is None else f"{row['mfu_percent']:.1f}%"
        print(
            f"{name:>16} | {row['ms_per_step']:9.1f} ms/step | tokens/s/GPU: {row['tokens_per_s']:9.0f} | "
            f"TFLOP/s/GPU: {row['tflops']:6.1f} | MFU: {mfu} | mem: {row['mem_gib']:.1f} GiB | "
            f"loss {row['loss']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

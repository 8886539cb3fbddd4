"""Training-step throughput of our Mistral/Mixtral next to transformers' on the same weights.

Default: a ~1B Mistral (hidden 2048, 16 layers, 16 heads, 8 KV heads, FFN 5632, vocab 32000) at
sequence 4096, micro-batch 4, bf16 autocast over fp32 weights for both models, one GPU.
``--mixtral``: a ~0.9B Mixtral (hidden 1024, 8 layers, 8 experts top-2, FFN 3584) against
MixtralForCausalLM with transformers' fastest experts implementation (``grouped_mm``).

Both models hold the same weights (ours is built, saved as a Hugging Face checkpoint and loaded
by transformers) and see the same batch; their first losses must agree before anything is timed.
One step = forward + backward + global-norm clip + fused AdamW. Steps run in turns (ours, theirs,
ours, ...), and the speedup is the median of the per-round ratios with its spread, so load from
other processes cannot favour one side. Memory per side: the persistent state (weights, grads,
optimizer) and the extra peak during its step (activations), both measured on GPU only.

    python benchmarks/bench_train.py                    # GPU, Mistral ~1B
    python benchmarks/bench_train.py --mixtral          # GPU, Mixtral ~0.9B
    python benchmarks/bench_train.py --tiny [--mixtral] # CPU smoke test of the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from megatron_lite.config import ModelConfig, OptimizerConfig
from megatron_lite.data.batching import make_batch
from megatron_lite.models import build_model
from megatron_lite.models.hf_io import save_hf
from megatron_lite.ops.benchmark_utils import ratio_summary, time_ms
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
BIG_MIXTRAL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=3584,
    num_layers=8,
    num_attention_heads=16,
    num_kv_heads=8,
    max_position_embeddings=4096,
    num_experts=8,
    top_k=2,
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
TINY_MIXTRAL = dict(TINY, num_experts=4, top_k=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU in fp32 (smoke test)")
    p.add_argument("--mixtral", action="store_true", help="Mixtral (sparse MoE) instead of Mistral")
    p.add_argument("--seq-length", type=int, default=None, help="default 4096 (32 with --tiny)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 4 (2 with --tiny)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (one step of each model per round)")
    p.add_argument(
        "--precision", choices=("bf16", "fp32"), default=None, help="default bf16 (fp32 with --tiny)"
    )
    p.add_argument("--recompute", action="store_true", help="full activation recomputation (both models)")
    p.add_argument("--only", choices=("ours", "hf"), default=None, help="benchmark one model only")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the per-device peak for MFU")
    p.add_argument(
        "--cpu-clock",
        action="store_true",
        help="on CPU, time with process CPU time (use with OMP_NUM_THREADS=1 on a shared machine)",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.seq_length = args.seq_length or (32 if args.tiny else 4096)
    args.micro_batch_size = args.micro_batch_size or (2 if args.tiny else 4)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """Our config for the benchmarked model (no sliding window, untied embeddings)."""
    table = {(False, False): BIG, (False, True): BIG_MIXTRAL, (True, False): TINY, (True, True): TINY_MIXTRAL}
    base = dict(table[(args.tiny, args.mixtral)])
    base["max_position_embeddings"] = max(base["max_position_embeddings"], args.seq_length)
    cfg = ModelConfig(arch="mixtral" if args.mixtral else "mistral", **base)
    cfg.validate()
    return cfg


def autocast(device: torch.device, precision: str):
    """The mixed-precision context both models run their forward under."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_ours(cfg: ModelConfig, args, device: torch.device) -> torch.nn.Module:
    """Our model built and initialised the way the trainer builds it."""
    dims = ParallelDims.build(1)
    dims.create_groups()
    model = build_model(cfg, "meta", dtype=torch.float32)
    materialize_local(model, dims, seed=1234, device=device)
    if args.recompute:
        apply_recompute(model, "full")
    return model


def step_ours(model, args, device: torch.device, tokens: torch.Tensor) -> Callable[[], float]:
    """A function running one training step of our model."""
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


def build_hf(ours: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    """transformers' model (SDPA attention; grouped_mm experts) loaded from our model's weights."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if args.mixtral:
        kwargs["experts_implementation"] = "grouped_mm"  # transformers' fastest for training
    with tempfile.TemporaryDirectory(prefix="bench_train_hf_") as tmp:
        save_hf(ours, tmp, dtype=torch.float32, overwrite=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs).to(device)
    model.config.use_cache = False
    if args.recompute:  # per-layer recomputation like ours; the method was renamed in transformers 5
        ckpt_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    model.train()
    return model


def step_hf(model, args, device: torch.device, tokens: torch.Tensor) -> Callable[[], float]:
    """A function running one training step of transformers' model, same recipe as ours."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            out = model(input_ids=inputs, use_cache=False)
        # Mixtral: transformers adds no load-balancing loss unless output_router_logits is set;
        # ours attaches its gradient only (same loss value), a negligible extra cost.
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def allocated(device: torch.device) -> int:
    """Bytes allocated on the GPU now (0 on CPU, where torch does not count)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Side:
    """One model under test: its step function and what it costs."""

    def __init__(self, name: str, step: Callable[[], float], state_bytes: int):
        self.name, self.step, self.state_bytes = name, step, state_bytes
        self.times: list[float] = []
        self.first_loss: float | None = None
        self.last_loss = float("nan")
        self.step_peak = 0  # extra bytes above the state during a step, max over rounds

    def run(self, device: torch.device, timed: bool, cpu_clock: bool = False) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = allocated(device)
        losses: list[float] = []
        if cpu_clock and device.type == "cpu":
            t0 = time.process_time()
            losses.append(self.step())
            ms = (time.process_time() - t0) * 1e3
        else:
            ms = time_ms(lambda: losses.append(self.step()), device, warmup=0, iters=1)
        if device.type == "cuda":
            self.step_peak = max(self.step_peak, torch.cuda.max_memory_allocated(device) - base)
        self.first_loss = losses[0] if self.first_loss is None else self.first_loss
        self.last_loss = losses[0]
        if timed:
            self.times.append(ms / 1e3)


def build_sides(cfg: ModelConfig, args, device: torch.device, tokens: torch.Tensor) -> list[Side]:
    """Both models from the same weights (or one of them with ``--only``), each stepped once."""
    sides = []
    start = allocated(device)
    ours = build_ours(cfg, args, device)
    if args.only != "hf":
        sides.append(Side("megatron_lite", step_ours(ours, args, device, tokens), allocated(device) - start))
    if args.only != "ours":
        start = allocated(device)
        hf = build_hf(ours, args, device)
        name = "hf_mixtral_grouped_mm" if args.mixtral else "hf_mistral_sdpa"
        sides.append(Side(name, step_hf(hf, args, device, tokens), allocated(device) - start))
    for side in sides:  # the first step allocates grads and optimizer states: part of the state
        start = allocated(device)
        side.run(device, timed=False)
        side.state_bytes += allocated(device) - start
    return sides


def check_same_start(sides: list[Side], precision: str) -> str | None:
    """Both models saw the same weights and batch: their first losses agree, else why not."""
    if len(sides) < 2:
        return None
    a, b = sides[0].first_loss, sides[1].first_loss
    tol = 1e-4 if precision == "fp32" else 2e-2
    if abs(a - b) > tol * max(abs(a), 1.0):
        return f"first losses differ: {sides[0].name} {a:.6f} vs {sides[1].name} {b:.6f} (tolerance {tol})"
    return None


def row_for(side: Side, cfg: ModelConfig, args, device: torch.device) -> dict:
    """The printed and saved numbers of one side."""
    seconds = statistics.median(side.times)
    peak = metrics.device_peak_tflops(device, args.peak_tflops)
    tok_s, tflops, mfu = metrics.throughput(
        args.micro_batch_size * args.seq_length,
        seconds,
        1,
        metrics.flops_per_token(cfg, args.seq_length),
        peak,
    )
    gib = (lambda n: n / 2**30) if device.type == "cuda" else (lambda n: None)
    return {
        "model": side.name,
        "ms_per_step": seconds * 1e3,
        "ms_min": min(side.times) * 1e3,
        "tokens_per_s": tok_s,
        "tflops": tflops,
        "mfu_percent": mfu,
        "state_gib": gib(side.state_bytes),
        "step_peak_extra_gib": gib(side.step_peak),
        "first_loss": side.first_loss,
        "loss": side.last_loss,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per model and the interleaved speedup."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("bench_train: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    cfg = model_config(args)
    print(
        f"# {cfg.arch} {metrics.total_params(cfg) / 1e6:.1f}M params, seq {args.seq_length}, micro-batch "
        f"{args.micro_batch_size}, {args.precision}, recompute {args.recompute}, "
        f"{metrics.flops_per_token(cfg, args.seq_length) / 1e9:.4g} GFLOP/token, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=gen)
    sides = build_sides(cfg, args, device, tokens.to(device))
    mismatch = check_same_start(sides, args.precision)
    if mismatch:
        print(f"bench_train: {mismatch}", file=sys.stderr)
        return 1
    for rnd in range(max(args.warmup - 1, 0) + args.iters):  # in turns: A B A B ...
        for side in sides:
            side.run(device, timed=rnd >= max(args.warmup - 1, 0), cpu_clock=args.cpu_clock)
    rows = [row_for(side, cfg, args, device) for side in sides]
    for row in rows:
        mfu = "n/a" if row["mfu_percent"] is None else f"{row['mfu_percent']:.1f}%"
        mem = (
            "n/a (CPU)"
            if row["state_gib"] is None
            else f"{row['state_gib']:.1f} + {row['step_peak_extra_gib']:.1f} GiB"
        )
        print(
            f"{row['model']:>22} | {row['ms_per_step']:9.1f} ms/step | "
            f"tokens/s/GPU: {row['tokens_per_s']:9.0f} | TFLOP/s/GPU: {row['tflops']:6.1f} | MFU: {mfu} | "
            f"mem state + step peak: {mem} | "
            f"loss {row['first_loss']:.3f} -> {row['loss']:.3f}"
        )
    summary = None
    if len(sides) == 2:
        summary = ratio_summary(sides[0].times, sides[1].times)
        print(
            f"speedup of megatron_lite (median of {args.iters} interleaved rounds): {summary['median']:.2f}x "
            f"(IQR {summary['q1']:.2f}-{summary['q3']:.2f}, range {summary['min']:.2f}-{summary['max']:.2f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "speedup": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

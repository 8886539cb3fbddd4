"""Model FLOPs, peak device throughput, MFU and memory.

FLOPs per token follow DESIGN.md exactly::

    6 * (non-embedding params + output layer) + 12 * layers * hidden * seq

where MoE layers count only the ``top_k`` active experts (the router counts in full). Parameters
are counted from the config, not from a (sharded) module, so every rank gets the same number.
"""

from __future__ import annotations

import resource
import sys

import torch

from megatron_lite.config import ModelConfig

# Dense bf16 peak TFLOP/s per device (per GCD for MI250X), matched against the CUDA device name
# in order, most specific first.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("MI250X", 191.5),
    ("MI250", 181.0),
    ("MI300X", 1307.0),
)


def layer_params(cfg: ModelConfig, active_only: bool = True) -> int:
    """Parameters of one transformer block (experts: only the ``top_k`` active ones if ``active_only``).

    The formula is the family's (``ModelSpec.layer_params``)."""
    return cfg.family().layer_params(cfg, active_only)


def flops_params(cfg: ModelConfig) -> int:
    """Non-embedding parameters plus the output layer, active experts only (the 6N of 6ND)."""
    return cfg.family().flops_params(cfg)


def total_params(cfg: ModelConfig) -> int:
    """All parameters of the unsharded model (every expert, embedding, untied output)."""
    out = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    return (
        cfg.num_layers * layer_params(cfg, active_only=False)
        + cfg.hidden_size
        + cfg.vocab_size * cfg.hidden_size
        + out
    )


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token, as defined in DESIGN.md."""
    return 6.0 * flops_params(cfg) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: ``override`` if given, the table for known GPUs, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS_BF16:
        if key in name:
            return peak
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def throughput(
    tokens_per_iter: int, seconds_per_iter: float, world_size: int, flops_token: float, peak: float | None
) -> tuple[float, float, float | None]:
    """(tokens/s/device, TFLOP/s/device, MFU in percent or None without a peak)."""
    tokens_per_s = tokens_per_iter / max(seconds_per_iter, 1e-12) / world_size
    tflops = tokens_per_s * flops_token / 1e12
    mfu = 100.0 * tflops / peak if peak else None
    return tokens_per_s, tflops, mfu

"""Options that need a GPU, checked against the machine before any process group exists.

Each failure is one line naming the option (or the GPU) and what to do instead. The machine is
described by a ``GpuInfo`` so the checks are plain functions, testable on a CPU-only host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_lite.config import Config, ConfigError

MIN_CAPABILITY = (7, 0)  # the CUDA kernels use sync warp shuffles
BF16_CAPABILITY = (8, 0)  # native bf16 math: A100 and newer


@dataclass(frozen=True)
class GpuInfo:
    """What torch sees: GPU count, the capability and name of this rank's GPU, ROCm or not."""

    count: int
    capability: tuple[int, int] | None = None
    name: str = ""
    hip: bool = False

    @classmethod
    def probe(cls, local_rank: int) -> GpuInfo:
        """The current machine, as seen from the rank with ``local_rank``."""
        if not torch.cuda.is_available():
            return cls(count=0)
        count = torch.cuda.device_count()
        if local_rank >= count:
            return cls(count=count)
        cap = torch.cuda.get_device_capability(local_rank)
        return cls(count, cap, torch.cuda.get_device_name(local_rank), torch.version.hip is not None)


def check_device_options(cfg: Config, gpu: GpuInfo | None = None, local_rank: int | None = None) -> None:
    """Raises ConfigError for a GPU-only option on a machine that cannot serve it.

    Args:
        cfg: the validated config.
        gpu: the machine (probed when None).
        local_rank: this process's GPU index (``LOCAL_RANK``, 0 when launched plainly).
    """
    tr = cfg.training
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    gpu = GpuInfo.probe(local_rank) if gpu is None else gpu
    if tr.device == "cuda" and gpu.count == 0:
        build = "a CPU-only build" if torch.version.cuda is None and torch.version.hip is None else "no GPU"
        raise ConfigError(
            f"training.device is 'cuda' but torch {torch.__version__} sees no GPU ({build}): "
            "set training.device: auto or cpu, or run on a GPU node"
        )
    on_gpu = tr.device == "cuda" or (tr.device == "auto" and gpu.count > 0)
    precision = tr.precision if tr.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if tr.attention_backend == "flash" and precision == "fp32":
        raise ConfigError(
            "training.attention_backend 'flash' needs training.precision bf16 or fp16 (flash-attn has "
            "no fp32 kernels): set training.precision: bf16 or training.attention_backend: auto"
        )
    if not on_gpu:
        return
    if local_rank >= gpu.count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {gpu.count} GPU(s) are visible: start at most {gpu.count} "
            "processes per node (torchrun --nproc-per-node) or check CUDA_VISIBLE_DEVICES"
        )
    if gpu.hip or gpu.capability is None:
        return
    cap = f"{gpu.capability[0]}.{gpu.capability[1]}"
    if gpu.capability < MIN_CAPABILITY:
        raise ConfigError(
            f"GPU {local_rank} ({gpu.name}, compute capability {cap}) is not supported: megatron_lite "
            "needs 7.0 or newer; set training.device: cpu"
        )
    if precision == "bf16" and gpu.capability < BF16_CAPABILITY:
        raise ConfigError(
            f"training.precision bf16 needs compute capability 8.0+ but GPU {local_rank} ({gpu.name}) "
            f"is {cap}: set training.precision: fp16 or fp32"
        )

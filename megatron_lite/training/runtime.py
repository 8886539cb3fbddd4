"""Where a run executes: checks that need the world size, device, precision, process groups, seeds.

Precision (Megatron-LM's and torchtitan's recipe, DESIGN.md principle 10). With ``training.precision
bf16`` (or fp16) the model's parameters are materialized in fp32 (so the initial values are exact),
copied into the optimizer's fp32 main parameters, then cast to the compute dtype
(``distributed_optimizer.build_data_parallel``). From then on:

* weights and activations are bf16: every matmul takes bf16 operands (the MoE expert GEMMs too),
  activations travel bf16 on every wire, and no weight is cast per microbatch;
* gradients accumulate over microbatches into fp32 main gradients, the data-parallel gradient
  buffers (``parallel.grad_buffer``; they exist whenever precision is not fp32, even on one
  process), reduced in fp32 unless ``parallel.grad_reduce_dtype bf16``;
* the optimizer (``optimizer.MainParamOptimizer``, or the distributed optimizer sharding them over
  dp) owns fp32 main parameters and Adam states, steps them from the main gradients and copies the
  result back into the bf16 weights; checkpoints hold the fp32 main values, so resume is exact;
* fp16 adds dynamic loss scaling: the fp32 main gradients are unscaled and a step with a
  non-finite norm is skipped.

No autocast: with bf16 weights it would only decide the dtype of the few ops that want fp32, and
those say so explicitly instead: RMSNorm and RoPE compute in fp32 and return the input dtype, the
router's softmax/top-k and the cross entropy run on fp32 copies of their logits.
Memory per parameter: 2 (bf16 weight) + 4 (main grad) + 4 (main param) + 8 (Adam), with the
distributed optimizer 2 + 4 + 12/dp (``benchmarks/bench_memory.py``). fp32 precision keeps fp32
parameters stepped directly by AdamW (4 + 4 + 8/dp with the distributed optimizer).

Everything parallel goes through the ``ParallelDims`` object (a world of one on one process, where it
creates no process groups); there is no module-level state.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import Config, ConfigError
from megatron_lite.models.common.attention_backends import flash_attn_available
from megatron_lite.parallel import comm
from megatron_lite.parallel.dims import ParallelDims, validate_layout
from megatron_lite.pipeline.stages import check_pipeline_config
from megatron_lite.training.device_checks import check_device_options
from megatron_lite.training.logging import check_backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def env_world_size() -> int:
    """World size announced by torchrun (1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda if available else cpu; under torchrun cuda picks ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def check_run_config(cfg: Config, world_size: int) -> int:
    """Checks that need the world size or the machine; raises ConfigError. Returns the DP size.

    Runs before any process group or tensor exists. Fills ``training.global_batch_size`` when unset.
    """
    par, tr = cfg.parallel, cfg.training
    if world_size % (par.tensor * par.pipeline):
        raise ConfigError(
            f"world size ({world_size}) is not divisible by parallel.tensor ({par.tensor}) "
            f"* parallel.pipeline ({par.pipeline})"
        )
    dp = validate_layout(cfg.model, par, world_size, cfg.data.seq_length).dp
    if tr.global_batch_size is None:
        tr.global_batch_size = tr.micro_batch_size * dp
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size ({tr.global_batch_size}) is not divisible by "
            f"training.micro_batch_size ({tr.micro_batch_size}) * data-parallel size ({dp})"
        )
    check_pipeline_config(cfg, tr.global_batch_size // (tr.micro_batch_size * dp))
    if tr.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but no CUDA device is available")
    _check_precision(cfg)
    _check_attention(cfg)
    check_device_options(cfg)  # GPU-only options on a machine that cannot serve them
    opt = cfg.optimizer
    decay = opt.lr_decay_iters if opt.lr_decay_iters is not None else tr.train_iters
    if opt.lr_decay_style != "constant" and decay <= opt.lr_warmup_iters:
        raise ConfigError(
            f"optimizer.lr_decay_iters ({decay}) must exceed optimizer.lr_warmup_iters "
            f"({opt.lr_warmup_iters})"
        )
    check_backends(cfg.logging)
    return dp


def _check_precision(cfg: Config) -> None:
    """The precision must run on this device, and the data-parallel settings must suit it."""
    device = resolve_device(cfg.training.device)
    precision = resolve_precision(cfg.training.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"training.precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
            "use 'fp16' (with loss scaling) or 'fp32'"
        )
    if cfg.parallel.grad_reduce_dtype == "bf16" and precision != "bf16":
        raise ConfigError(
            f"parallel.grad_reduce_dtype 'bf16' needs training.precision bf16 (it is {precision!r}): "
            "a bf16 sum keeps 8 mantissa bits, fewer than the gradients it reduces; use fp32"
        )


def _check_attention(cfg: Config) -> None:
    """A requested attention backend must be able to run this model on this machine."""
    backend = cfg.training.attention_backend
    on_cuda = resolve_device(cfg.training.device).type == "cuda"
    if backend in ("flash", "flex") and not on_cuda:
        raise ConfigError(f"training.attention_backend {backend!r} needs a CUDA device; use 'auto' on CPU")
    if backend == "flash" and not flash_attn_available():
        raise ConfigError(
            "training.attention_backend 'flash' needs the 'flash-attn' package (pip install flash-attn)"
        )
    cp = cfg.parallel.context
    if cp > 1 and backend != "auto":
        raise ConfigError(
            f"training.attention_backend {backend!r} cannot serve parallel.context ({cp}): context "
            "parallelism attends with an explicit mask over gathered K/V; use 'auto'"
        )
    window = cfg.model.sliding_window
    if backend == "sdpa" and (cfg.data.reset_attention_mask or (window and window < cfg.data.seq_length)):
        raise ConfigError(
            "training.attention_backend 'sdpa' serves plain causal attention only: not with "
            "data.reset_attention_mask or a model.sliding_window below data.seq_length"
        )


@dataclass
class Runtime:
    """Device, precision and process layout of this rank."""

    device: torch.device
    precision: str
    dims: ParallelDims
    distributed: bool = False

    @property
    def rank(self) -> int:
        """Global rank."""
        return self.dims.rank or 0

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return self.dims.world_size

    @property
    def is_logging_rank(self) -> bool:
        """The last rank prints (it holds the loss once pipeline stages exist, as in Megatron)."""
        return self.rank == self.world_size - 1

    @property
    def dtype(self) -> torch.dtype:
        """The compute (parameter and activation) dtype."""
        return DTYPES[self.precision]

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the dp x cp group (identity on one process).

        Context-parallel ranks hold different tokens of the same samples, so token counts and loss
        sums add over them as over data-parallel replicas.
        """
        if self.distributed and self.dims.dp * self.dims.cp > 1:
            comm.all_reduce(t, self.dims.group("dp_cp"))
        return t

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj):
        """Every rank's picklable ``obj`` in rank order, on every rank (``[obj]`` on one process)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_runtime(cfg: Config) -> Runtime:
    """Pick the device, start the process group under torchrun, build the rank grid, seed RNGs."""
    device = resolve_device(cfg.training.device)
    precision = resolve_precision(cfg.training.precision, device)
    world_size = env_world_size()
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(minutes=cfg.training.dist_timeout_minutes)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    # a world of one creates no groups; sub-groups get the same collective timeout as the world
    dims.create_groups(datetime.timedelta(minutes=cfg.training.dist_timeout_minutes))
    runtime = Runtime(device, precision, dims, distributed=distributed)
    set_seeds(cfg.training.seed, dims)
    return runtime


def shutdown(runtime: Runtime) -> None:
    """Tear down the process group started by ``init_runtime``."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def set_seeds(seed: int, dims: ParallelDims) -> None:
    """Seed python, numpy and torch per rank, deterministically.

    Megatron offsets the seed by ``100 * pipeline rank`` so stages differ while tensor/data
    replicas agree; we keep that rule. Weight init does not use these generators (it is seeded
    by name in ``init_weights``/``materialize_local``), so replicas start identical regardless.
    """
    rank_seed = seed + 100 * dims.local.pp
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)  # also seeds every CUDA device

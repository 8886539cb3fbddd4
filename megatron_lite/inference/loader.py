"""Find and load a model for inference from whatever checkpoint directory the user points at."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


class UnsupportedCheckpointError(ValueError):
    """The directory holds no checkpoint format that inference can read."""


def load_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean "bad checkpoint or path" to a command-line tool, not a bug.

    Tools catch these and print one line naming the cause; anything else keeps its traceback.
    Imported lazily so ``megatron_lite.inference`` stays light to import.
    """
    from megatron_lite.models.hf_io import HFCheckpointError
    from megatron_lite.training.checkpoint import CheckpointError

    return (CheckpointError, HFCheckpointError, UnsupportedCheckpointError, FileNotFoundError, ValueError)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds: ``"hf"`` (config.json + safetensors) or ``"training"`` (a checkpoint
    directory written by the trainer, any layout); raises for anything else."""
    from megatron_lite.models.hf_files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, is_hf_dir
    from megatron_lite.training.checkpoint import TRACKER

    p = Path(path)
    if not p.is_dir():
        raise UnsupportedCheckpointError(f"{p}: not a directory")
    if is_hf_dir(p):
        return "hf"
    if (p / TRACKER).is_file():
        return "training"
    raise UnsupportedCheckpointError(
        f"{p}: unsupported checkpoint (expected a Hugging Face directory with {CONFIG_FILE} and "
        f"{SINGLE_FILE} or {INDEX_FILE}, or a training checkpoint directory with {TRACKER})"
    )


def load_model_for_inference(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tensor_parallel: int = 1,
):
    """Load the model in ``path`` (dispatching on its contents) in eval mode.

    Args:
        path: a Hugging Face directory or a training checkpoint directory (any tp/pp/ep layout;
            its shards are reassembled to full tensors).
        dtype: parameter dtype.
        device: where the model lives.
        tensor_parallel: split the model over this many ranks (attention heads, FFN columns,
            vocabulary); needs an initialised ``torch.distributed`` whose world size is a multiple
            of it (every rank calls this; ranks beyond one tp group are data-parallel replicas).
            Each rank reads the full weights once, then keeps only its shards.

    Returns:
        A plain ``Transformer``, or a tensor-parallel one when ``tensor_parallel > 1``.
    """
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    if tensor_parallel > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"tensor_parallel={tensor_parallel} needs torch.distributed initialised (run under torchrun)"
        )
    kind = checkpoint_kind(path)
    if kind == "hf":
        from megatron_lite.models.hf_io import load_hf

        model = load_hf(path, dtype=dtype, device=device)
    else:  # a training checkpoint of any (tp, pp, ep) layout: reassembled to full tensors
        from megatron_lite.training.convert import model_from_full_state, read_full_state

        cfg, full = read_full_state(path)
        model = model_from_full_state(cfg.model, full).to(device=device, dtype=dtype)
    if tensor_parallel > 1:
        model = _tensor_parallel(model, tensor_parallel)
    return model.eval()


def _tensor_parallel(model, tp: int):
    """Split a full model's weights over the tp groups of the default process group."""
    from megatron_lite.config import ConfigError, ParallelConfig
    from megatron_lite.parallel.dims import ParallelDims
    from megatron_lite.parallel.parallelize import parallelize

    pcfg = ParallelConfig(tensor=tp)
    world = dist.get_world_size()
    if world % tp:
        raise ConfigError(f"tensor_parallel={tp} does not divide the world size {world}")
    dims = ParallelDims.from_config(pcfg, world)
    dims.create_groups()
    with torch.no_grad():
        return parallelize(model, dims, pcfg)  # shards sliced from the real weights

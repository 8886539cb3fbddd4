"""Find and load a model for inference from whatever checkpoint directory the user points at."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class UnsupportedCheckpointError(ValueError):
    """The directory holds no checkpoint format that inference can read."""


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
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Load the model in ``path`` (dispatching on its contents) in eval mode."""
    kind = checkpoint_kind(path)
    if kind == "hf":
        from megatron_lite.models.hf_io import load_hf

        model = load_hf(path, dtype=dtype, device=device)
    else:  # a training checkpoint of any (tp, pp, ep) layout: reassembled to full tensors
        from megatron_lite.training.convert import model_from_full_state, read_full_state

        cfg, full = read_full_state(path)
        model = model_from_full_state(cfg.model, full).to(device=device, dtype=dtype)
    return model.eval()

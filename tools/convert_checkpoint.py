"""Convert model weights between Hugging Face and megatron_lite checkpoints of any layout.

The input kind is detected: a Hugging Face directory (config.json + safetensors) or a training
checkpoint directory (``latest_checkpointed_iteration.txt``, ``iter_*/mp_rank_*``).

    # training checkpoint (any tp/pp/ep) -> Hugging Face (transformers loads it)
    python tools/convert_checkpoint.py --input runs/ckpt --output hf_out --to hf --dtype bf16

    # Hugging Face -> model-only training checkpoint in a tp=2, pp=2 layout, to start from with
    # --training.load (or point --training.initial_load at the HF directory directly)
    python tools/convert_checkpoint.py --input Mistral-7B --output ckpt_tp2pp2 --to megatron_lite \\
        --tensor 2 --pipeline 2

    # reshard a training checkpoint (weights only) to another layout
    python tools/convert_checkpoint.py --input runs/ckpt --output ckpt_tp4 --to megatron_lite --tensor 4

    # ... with its AdamW states, LR schedule and data position: training continues with
    # --training.load ckpt_tp4 --parallel.tensor 4 (from plain or distributed-optimizer checkpoints)
    python tools/convert_checkpoint.py --input runs/ckpt --output ckpt_tp4 --to megatron_lite \
        --tensor 4 --with-optimizer

Exit status 0 on success; 1 with one ``error: ...`` line naming the file on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from megatron_lite.config import Config, ConfigError, config_from_dict
from megatron_lite.models.hf_files import is_hf_dir
from megatron_lite.models.hf_io import (
    HFCheckpointError,
    SafetensorsReader,
    hf_state_to_canonical,
    read_hf_config,
)
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.convert import (
    layout_dims,
    model_from_full_state,
    read_full_state,
    write_model_checkpoint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="HF directory or training checkpoint directory")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--to", required=True, choices=("hf", "megatron_lite"), help="output format")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="HF output dtype")
    p.add_argument("--tensor", type=int, default=1, help="target tensor parallel size")
    p.add_argument("--pipeline", type=int, default=1, help="target pipeline parallel size")
    p.add_argument("--virtual-pipeline", type=int, default=1, help="target virtual chunks per stage")
    p.add_argument("--expert", type=int, default=1, help="target expert parallel size")
    p.add_argument("--expert-tensor", type=int, default=None, help="target expert tensor parallel size")
    p.add_argument(
        "--with-optimizer",
        action="store_true",
        help="training checkpoint -> megatron_lite only: also reshard the AdamW states and keep the "
        "iteration, LR schedule and data position, so training continues in the new layout",
    )
    return p.parse_args(argv)


def read_input(args: argparse.Namespace, log) -> tuple[Config, dict[str, torch.Tensor], object]:
    """The input's config, canonical full state dict and (``--with-optimizer``) resume state."""
    src = Path(args.input)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if args.with_optimizer:
        if is_hf_dir(src) or args.to != "megatron_lite":
            raise CheckpointError(
                "--with-optimizer converts a training checkpoint to --to megatron_lite only"
            )
        from megatron_lite.training.convert_optimizer import read_training_state

        cfg, full, resume = read_training_state(src, args.iteration, progress=log)
        log(f"read training checkpoint {src} with optimizer states (iteration {resume.iteration})")
        return cfg, full, resume
    if is_hf_dir(src):
        model_cfg = read_hf_config(src)
        with SafetensorsReader(src) as reader:
            full = {
                n: t.float().clone() for n, t in hf_state_to_canonical(reader, model_cfg, where=reader.where)
            }
        log(f"read Hugging Face checkpoint {src} ({model_cfg.arch}, {len(full)} tensors)")
        return config_from_dict({"model": dataclasses.asdict(model_cfg)}), full, None
    cfg, full = read_full_state(src, args.iteration, progress=log)
    par = cfg.parallel
    log(f"read training checkpoint {src} (tp={par.tensor}, pp={par.pipeline}, ep={par.expert})")
    return cfg, full, None


def target_config(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with the target layout; the layout is validated against the model first."""
    data = cfg.to_dict()
    data["parallel"].update(
        tensor=args.tensor,
        pipeline=args.pipeline,
        virtual_pipeline=args.virtual_pipeline,
        expert=args.expert,
        expert_tensor=args.expert_tensor,
    )
    target = config_from_dict(data)
    par = target.parallel
    dims = layout_dims(par.tensor, par.pipeline, par.expert, par.expert_tensor)
    from megatron_lite.parallel.dims import validate_layout

    validate_layout(target.model, par, dims.world_size)
    return target


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda line: print(f"[convert] {line}", flush=True)  # noqa: E731
    try:
        cfg, full, resume = read_input(args, log)
        if args.to == "hf":
            model = model_from_full_state(cfg.model, full)
            from megatron_lite.models.hf_io import save_hf

            save_hf(model, args.output, dtype=DTYPES[args.dtype])
            log(f"wrote Hugging Face checkpoint {args.output} ({args.dtype})")
        else:
            target = target_config(cfg, args)
            final = write_model_checkpoint(full, target, args.output, progress=log, resume=resume)
            kind = "model-only" if resume is None else "resumable (optimizer, schedule, data position)"
            log(f"wrote {kind} training checkpoint {final}")
    except (CheckpointError, HFCheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert model weights between Hugging Face and megatron_lite checkpoints of any layout.

The input kind is detected: a Hugging Face directory (config.json + safetensors) or a training
checkpoint directory (``latest_checkpointed_iteration.txt``, ``iter_*/mp_rank_*``).

    # training checkpoint (any tp/pp/ep) -> Hugging Face (transformers loads it)
    python tools/convert_checkpoint.py --input runs/ckpt --output hf_out --to hf --dtype bf16
    # (--overwrite replaces an existing output directory)

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

    # the exponential moving average of the weights (a run with training.ema_decay) -> Hugging Face
    python tools/convert_checkpoint.py --input runs/ckpt --output hf_ema --to hf --weights ema

Conversion streams: one tensor is read at a time and one output file is built at a time (the HF
side is written tensor by tensor), so memory stays near the size of the largest output file
whatever the size of the model. Weights keep the input's dtype unless ``--dtype`` is given.
``--with-optimizer`` holds the whole model's Adam moments in memory (see convert_optimizer).
The target layout is checked against the model before any tensor is read. An HF export holds
``config.json`` (the source model's, token ids included, when the weights came from HF),
``generation_config.json`` and the tokenizer files (``models/hf_extras.py`` says where from).

Exit status 0 on success; 1 with one ``error: ...`` line naming the file on bad input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.models.hf_io import HFCheckpointError, check_output_dir
from megatron_lite.training.checkpoint import TRACKER, CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="HF directory or training checkpoint directory")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--to", required=True, choices=("hf", "megatron_lite"), help="output format")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="output dtype (default: the input's)")
    p.add_argument("--tensor", type=int, default=1, help="target tensor parallel size")
    p.add_argument("--pipeline", type=int, default=1, help="target pipeline parallel size")
    p.add_argument("--virtual-pipeline", type=int, default=1, help="target virtual chunks per stage")
    p.add_argument("--expert", type=int, default=1, help="target expert parallel size")
    p.add_argument("--expert-tensor", type=int, default=None, help="target expert tensor parallel size")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="HF output: safetensors file size limit")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument(
        "--weights",
        choices=("model", "ema"),
        default="model",
        help="training checkpoint input: the weights (model) or their moving average (ema, from a run "
        "with training.ema_decay)",
    )
    p.add_argument(
        "--with-optimizer",
        action="store_true",
        help="training checkpoint -> megatron_lite only: also reshard the AdamW states and keep the "
        "iteration, LR schedule and data position, so training continues in the new layout",
    )
    return p.parse_args(argv)


def input_config(args: argparse.Namespace) -> Config:
    """The input's config, from its ``config.json`` or ``config.yaml`` alone (no tensor is read)."""
    import dataclasses

    from megatron_lite.config import config_from_dict
    from megatron_lite.models.hf_files import is_hf_dir
    from megatron_lite.models.hf_io import read_hf_config
    from megatron_lite.training.convert import read_checkpoint_config
    from megatron_lite.training.convert_stream import open_source

    src = Path(args.input)
    if is_hf_dir(src):
        if args.with_optimizer:
            raise CheckpointError(
                "--with-optimizer converts a training checkpoint, not a Hugging Face directory"
            )
        return config_from_dict({"model": dataclasses.asdict(read_hf_config(src))})
    if not src.is_dir() or (not (src / TRACKER).is_file() and args.iteration is None):
        open_source(src)  # raises, naming what the directory lacks
    return read_checkpoint_config(src, args.iteration)[0]


def target_config(cfg: Config, args: argparse.Namespace) -> Config:
    """``cfg`` with the target layout; the layout is validated against the model first."""
    from megatron_lite.config import config_from_dict
    from megatron_lite.parallel.dims import validate_layout
    from megatron_lite.training.convert import layout_dims

    data = cfg.to_dict()
    data["parallel"].update(
        tensor=args.tensor,
        pipeline=args.pipeline,
        virtual_pipeline=args.virtual_pipeline,
        expert=args.expert,
        expert_tensor=args.expert_tensor,
        context=1,  # cp does not shard parameters: a run picks it at start (--parallel.context)
    )
    target = config_from_dict(data)
    par = target.parallel
    par.validate()
    dims = layout_dims(par.tensor, par.pipeline, par.expert, par.expert_tensor)
    validate_layout(target.model, par, dims.world_size)
    return target


def check_output(args: argparse.Namespace) -> None:
    """Refuse an output that would destroy the input or an existing checkpoint (unless --overwrite)."""
    out, src = Path(args.output), Path(args.input)
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: is the input; write the conversion to another directory")
    if args.to == "hf":
        check_output_dir(out, args.overwrite)
    elif (out / TRACKER).exists() and not args.overwrite:
        raise CheckpointError(f"{out}: already holds a checkpoint ({TRACKER}); use --overwrite to replace it")
    elif out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")


def write_training(args, target: Config, dtype, log) -> Path:
    """HF or training checkpoint -> training checkpoint in the target layout (streamed)."""
    from megatron_lite.training.convert import write_model_checkpoint
    from megatron_lite.training.convert_stream import HFSource, open_source

    out = Path(args.output)
    replace = out.exists() and any(out.iterdir())  # only with --overwrite (checked before)
    root = out.parent / f".{out.name}.tmp-{os.getpid()}" if replace else out
    if replace:
        shutil.rmtree(root, ignore_errors=True)  # leftovers of an interrupted --overwrite
    if args.with_optimizer:
        from megatron_lite.training.convert_optimizer import read_training_state

        _, full, resume = read_training_state(args.input, args.iteration, progress=log)
        log(f"read training checkpoint {args.input} with optimizer states (iteration {resume.iteration})")
        final = write_model_checkpoint(full, target, root, progress=log, resume=resume, dtype=dtype)
    else:
        source = open_source(args.input, args.iteration, args.weights)
        log(f"reading {source.describe()} tensor by tensor")
        origin = source.path if isinstance(source, HFSource) else None
        try:
            final = write_model_checkpoint(source.get, target, root, log, dtype=dtype, hf_source=origin)
        finally:
            source.close()
    if replace:
        from megatron_lite.models.hf_files import move_into_place

        move_into_place(root, out)
        final = out / final.name
    return final


def write_hf(args, dtype, log) -> None:
    """HF or training checkpoint -> HF directory (streamed), with config, generation and tokenizer files."""
    from megatron_lite.models.hf_extras import export_extras, find_origin
    from megatron_lite.models.hf_io import write_hf_checkpoint
    from megatron_lite.training.convert_stream import HFSource, open_source

    source = open_source(args.input, args.iteration, args.weights)
    log(f"reading {source.describe()} tensor by tensor")
    try:
        cfg = source.config
        if isinstance(source, HFSource):
            origin = source.path
        else:
            origin = find_origin(cfg, source.it_dir)
        base, files = export_extras(cfg, origin)
        if dtype is None:
            dtype = source.dtype()
        max_bytes = int(args.max_shard_gb * 2**30)
        write_hf_checkpoint(source.get, cfg.model, args.output, dtype, max_bytes, args.overwrite, base, files)
    finally:
        source.close()
    kept = f"; config and tokenizer files from {origin}" if origin is not None else ""
    log(f"wrote Hugging Face checkpoint {args.output} ({str(dtype).removeprefix('torch.')}{kept})")


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda line: print(f"[convert] {line}", flush=True)  # noqa: E731
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.with_optimizer and args.to != "megatron_lite":
            raise CheckpointError(
                "--with-optimizer converts a training checkpoint to --to megatron_lite only"
            )
        if args.with_optimizer and args.weights == "ema":
            raise CheckpointError(
                "--weights ema exports the EMA as weights; --with-optimizer keeps training the weights"
            )
        cfg = input_config(args)  # reads config files only
        check_output(args)
        if args.to == "hf":
            write_hf(args, dtype, log)
        else:
            target = target_config(cfg, args)  # a bad layout is refused before any tensor is read
            final = write_training(args, target, dtype, log)
            kind = (
                "model-only" if not args.with_optimizer else "resumable (optimizer, schedule, data position)"
            )
            log(f"wrote {kind} training checkpoint {final}")
    except (CheckpointError, HFCheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

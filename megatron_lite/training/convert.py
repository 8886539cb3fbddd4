"""Move model weights between layouts: training checkpoints of any (tp, pp, ep) <-> canonical <-> HF.

Everything goes through the canonical, unsharded parameter names and the shard rules of
``parallel.sharding`` (DESIGN.md principle 4):

* ``read_full_state``: every shard file of a training checkpoint -> one canonical state dict.
* ``write_model_checkpoint``: a canonical state dict -> a training checkpoint in any target
  layout (``mp_rank_XX[_PPP][_EEE]`` directories): model-only at iteration 0, the starting point
  of continued pretraining (Megatron's "release" checkpoint), or with the optimizer states,
  schedule and data position that ``convert_optimizer`` carries over.
* ``load_initial_weights`` / ``load_hf_into_local``: each rank reads only its own shards, straight
  from a Hugging Face directory or a training checkpoint (``training.initial_load``).

Checkpoint shard files hold, for each pipeline stage, the canonical names of the layers that
stage owns (global layer indices), so pipeline stages need no renaming.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml

from megatron_lite.config import Config, ConfigError, ModelConfig, config_from_dict
from megatron_lite.models.hf_files import is_hf_dir
from megatron_lite.models.hf_io import (
    SafetensorsReader,
    canonical_names,
    hf_state_to_canonical,
    read_hf_config,
)
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.parallelize import load_full_state_dict, local_part
from megatron_lite.parallel.sharding import shard_tensor, unshard_tensors
from megatron_lite.pipeline.stages import stage_layer_ids, stage_roles
from megatron_lite.training import checkpoint
from megatron_lite.training.checkpoint import CheckpointError


def layout_dims(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None) -> ParallelDims:
    """The smallest rank grid holding every distinct shard of a (tp, pp, ep, etp) layout.

    Data-parallel replicas hold identical shards, so the grid uses the least dp for which the
    expert layout tiles a pipeline stage (``tp * dp`` divisible by ``etp * ep``).
    """
    etp = tp if etp is None else etp
    dp = math.lcm(tp, etp * ep) // tp
    return ParallelDims.build(tp * pp * dp, tp=tp, pp=pp, ep=ep, etp=etp)


def shard_writers(dims: ParallelDims) -> list[int]:
    """One rank per distinct shard file of ``dims`` (the ranks that write checkpoints)."""
    return [r for r in range(dims.world_size) if checkpoint.is_shard_writer(dims, r)]


def stage_names(cfg: Config, pp_rank: int) -> list[str]:
    """Canonical parameter names stored by pipeline rank ``pp_rank``: those of its model (built on
    meta, as the trainer builds it), so a tied embedding's last-stage copy is included too."""
    from megatron_lite.models import build_model

    pre, post = stage_roles(pp_rank, cfg.parallel.pipeline)
    layers = stage_layer_ids(cfg, pp_rank)
    model = build_model(cfg.model, "meta", layer_ids=layers, pre_process=pre, post_process=post)
    return [name for name, _ in model.named_parameters()]


def read_checkpoint_config(root: str | Path, iteration: int | None = None) -> tuple[Config, int]:
    """The resolved config and iteration of checkpoint ``iteration`` (default: latest) under ``root``."""
    root = Path(root)
    if iteration is None:
        iteration = checkpoint.latest_iteration(root)
        if iteration is None:
            raise CheckpointError(
                f"{root}: no {checkpoint.TRACKER}; is this a training checkpoint directory?"
            )
    cfg_file = checkpoint.iteration_dir(root, iteration) / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint config {cfg_file} is missing")
    try:
        cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except (yaml.YAMLError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint config {cfg_file} is unreadable: {exc}") from None
    return cfg, iteration


def read_shard_states(
    root: str | Path, iteration: int | None = None, progress: Callable[[str], None] = lambda _s: None
) -> tuple[Config, Path, ParallelDims, dict[int, dict]]:
    """Every distinct shard file of a training checkpoint, keyed by a rank of the smallest grid.

    Returns:
        ``(config of the run, iteration directory, that grid, rank -> file contents)``.
    """
    cfg, iteration = read_checkpoint_config(root, iteration)
    par = cfg.parallel
    dims = layout_dims(par.tensor, par.pipeline, par.expert, par.expert_tensor)
    it_dir = checkpoint.iteration_dir(root, iteration)
    states, writers = {}, shard_writers(dims)
    for k, rank in enumerate(writers, 1):
        file = it_dir / checkpoint.shard_name(dims, rank) / checkpoint.MODEL_FILE
        states[rank] = checkpoint.read_state(file)
        progress(f"[{k}/{len(writers)}] read {file}")
    return cfg, it_dir, dims, states


def unshard_all(
    locals_by_name: dict[str, dict[int, torch.Tensor]], names: list[str], cfg: Config, dims, where: Path
) -> dict[str, torch.Tensor]:
    """Full tensors of ``names`` from per-rank shards (``name -> rank -> local tensor``)."""
    full = {}
    for name in names:
        if name not in locals_by_name:
            raise CheckpointError(f"{where}: no shard file holds {name}")
        try:
            full[name] = unshard_tensors(locals_by_name[name], name, cfg.model, dims)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    return full


def read_full_state(
    root: str | Path, iteration: int | None = None, progress: Callable[[str], None] = lambda _s: None
) -> tuple[Config, dict[str, torch.Tensor]]:
    """Reassemble the canonical, unsharded model state of a training checkpoint of any layout.

    Args:
        root: the checkpoint directory (``training.save`` of the run).
        iteration: which iteration (default: the tracker's).
        progress: receives one line per shard file read.

    Returns:
        ``(config of the run, canonical name -> full tensor)``.

    Raises:
        CheckpointError: a shard file is missing or unreadable, or shards do not fit together.
    """
    cfg, it_dir, dims, states = read_shard_states(root, iteration, progress)
    locals_by_name: dict[str, dict[int, torch.Tensor]] = {}
    for rank, state in states.items():
        for name, tensor in state["model"].items():
            locals_by_name.setdefault(name, {})[rank] = tensor
    return cfg, unshard_all(locals_by_name, canonical_names(cfg.model), cfg, dims, it_dir)


def write_model_checkpoint(
    full: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    cfg: Config,
    root: str | Path,
    progress: Callable[[str], None] = lambda _s: None,
    resume=None,
    dtype: torch.dtype | None = None,
    hf_source: Path | None = None,
) -> Path:
    """Write a training checkpoint of ``full`` in ``cfg.parallel``'s layout, one shard file at a time.

    Without ``resume`` it is model-only (iteration 0: a fresh run starts from these weights); with
    a ``convert_optimizer.ResumeState`` it carries the optimizer, schedule and data position, and
    training continues from it in the new layout.

    The directory is assembled under a temporary name and renamed into place; the tracker file
    is written last, so an interrupted conversion leaves nothing that looks complete.

    Args:
        full: canonical name -> full tensor: a dict, or a function reading one tensor from the
            source (``convert_stream``), so only one shard file's tensors are held at once.
        cfg: config whose ``model`` matches ``full`` and whose ``parallel`` is the target layout.
        root: output checkpoint directory (created; must not hold a checkpoint already).
        progress: receives one line per shard file written.
        resume: optimizer states and position of the source run, or None.
        dtype: dtype of the written weights (default: the source's).
        hf_source: the HF directory the weights come from: its config and tokenizer files are
            kept in ``iter_*/hf_source/`` so that an export back to HF can restore them.

    Returns:
        The ``iter_N`` directory.
    """
    get = full.__getitem__ if isinstance(full, Mapping) else full
    root = Path(root)
    if (root / checkpoint.TRACKER).exists():
        raise CheckpointError(
            f"{root}: already holds a checkpoint ({checkpoint.TRACKER}); choose a new directory"
        )
    par = cfg.parallel
    dims = layout_dims(par.tensor, par.pipeline, par.expert, par.expert_tensor)
    iteration = resume.iteration if resume is not None else 0
    final = checkpoint.iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted conversion
    tmp.mkdir(parents=True)
    config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (tmp / "config.yaml").write_text(config_yaml)
    writers = shard_writers(dims)
    for k, rank in enumerate(writers, 1):
        coords = dims.coords(rank)
        local = {}
        for n in stage_names(cfg, coords.pp):
            tensor = get(n)
            local[n] = shard_tensor(tensor if dtype is None else tensor.to(dtype), n, cfg.model, coords)
            del tensor  # the full tensor goes now: one shard file's tensors are held, not the model
        if resume is None:
            state = checkpoint.model_only_state(local, config_yaml)
        else:
            state = resume.shard_state(local, cfg.model, coords, config_yaml)
        out = tmp / checkpoint.shard_name(dims, rank) / checkpoint.MODEL_FILE
        out.parent.mkdir(exist_ok=True)
        checkpoint.atomic_save(state, out)
        del local, state
        progress(f"[{k}/{len(writers)}] wrote {out.parent.name}")
    if hf_source is not None:
        from megatron_lite.models.hf_extras import HF_SOURCE_DIR, copy_side_files

        copy_side_files(hf_source, tmp / HF_SOURCE_DIR)
    checkpoint.publish(tmp, final, root, iteration)
    return final


def model_config_matches(expected: ModelConfig, found: ModelConfig, where: str) -> None:
    """Raise CheckpointError naming the first model field where ``found`` differs from ``expected``."""
    for field in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        a, b = getattr(expected, field), getattr(found, field)
        if a != b:
            raise CheckpointError(f"{where}: model.{field} is {b} there but {a} in this run's config")
    moe_only = ("num_experts", "top_k")
    for field in ("num_attention_heads", "num_kv_heads", "tie_embeddings", *moe_only):
        if field in moe_only and not expected.is_moe:
            continue
        a, b = getattr(expected, field), getattr(found, field)
        if a != b:
            raise CheckpointError(f"{where}: model.{field} is {b} there but {a} in this run's config")


@torch.no_grad()
def load_hf_into_local(model: torch.nn.Module, path: str | Path, dims: ParallelDims) -> int:
    """Copy this rank's shards of a Hugging Face checkpoint into the (materialised) local model.

    Only the tensors this rank holds are read (memory-mapped), so every rank of a large model
    reads its share directly from the HF files.

    Returns:
        The number of parameters loaded.

    Raises:
        CheckpointError: the HF model's shape disagrees with the run's model config.
    """
    hf_cfg = read_hf_config(path)
    model_config_matches(model.cfg, hf_cfg, str(Path(path) / "config.json"))
    params = dict(model.named_parameters())
    with SafetensorsReader(path) as reader:
        for name, full in hf_state_to_canonical(reader, model.cfg, list(params), where=reader.where):
            params[name].copy_(local_part(model, name, full, dims))
    return len(params)


def model_from_full_state(model_cfg: ModelConfig, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A whole, unparallelized model holding ``full`` (tensors are adopted, not copied)."""
    from megatron_lite.models import build_model

    model = build_model(model_cfg, "meta", dtype=torch.float32)
    model.load_state_dict(full, strict=True, assign=True)
    return model


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, path: str | Path, cfg: Config, dims: ParallelDims) -> str:
    """Give the local model the weights in ``path`` (``training.initial_load``); returns what was read.

    ``path`` is a Hugging Face directory (each rank reads only its shards) or a training
    checkpoint of any layout (the same layout reads this rank's shard file; another layout is
    reassembled to full tensors and re-sharded). Optimizer state and data position are not read.
    """
    if is_hf_dir(path):
        load_hf_into_local(model, path, dims)
        return "Hugging Face checkpoint"
    src_cfg, iteration = read_checkpoint_config(path)
    model_config_matches(cfg.model, src_cfg.model, str(Path(path) / "config.yaml"))
    same = [getattr(src_cfg.parallel, f) for f in _LAYOUT] == [getattr(cfg.parallel, f) for f in _LAYOUT]
    if same:
        file = checkpoint.iteration_dir(path, iteration) / checkpoint.shard_name(dims, dims.rank or 0)
        try:
            model.load_state_dict(checkpoint.read_state(file / checkpoint.MODEL_FILE)["model"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{file}: does not fit this model: {str(exc).splitlines()[0]}") from None
        return f"checkpoint iteration {iteration} (same layout)"
    from megatron_lite.training.convert_stream import CheckpointSource, LazyState

    # one full tensor at a time, only those of this rank's parameters (never the whole model)
    load_full_state_dict(model, LazyState(CheckpointSource(path, iteration)), dims)
    return f"checkpoint iteration {iteration} (resharded)"


_LAYOUT = (
    "tensor",
    "pipeline",
    "virtual_pipeline",
    "expert",
    "expert_tensor",
    "num_layers_in_first_stage",
    "num_layers_in_last_stage",
)

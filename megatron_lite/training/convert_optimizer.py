"""Carry AdamW states, schedule and data position across a (tp, pp, ep) layout change.

Adam's moments have the shape of their parameter, so they are resharded with the parameter's own
shard rule (``parallel.sharding``): reassembled to canonical full tensors from every shard file,
then cut for each rank of the new layout. The plain optimizer's state is indexed by position, in
the order ``optimizer.param_groups`` builds (decayed parameters in model order, then the others),
which is how positions are turned back into canonical names here. A checkpoint's EMA of the
weights (``training.ema_decay``, key ``"ema"``) is resharded the same way and kept.

Memory: the whole model's moments are held at once (8 bytes per parameter on top of the weights),
as any offline resharding of a non-distributed checkpoint must.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lite.config import Config, ModelConfig
from megatron_lite.models.hf_io import canonical_names
from megatron_lite.parallel.sharding import shard_tensor
from megatron_lite.training.checkpoint import CheckpointError, optimizer_shard_sources
from megatron_lite.training.convert import read_shard_states, unshard_all
from megatron_lite.training.distributed_optimizer import assemble_piece_states
from megatron_lite.training.optimizer import no_weight_decay, position_names

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class ResumeState:
    """What a resharded checkpoint needs besides the weights: optimizer, schedule, position."""

    iteration: int
    consumed_samples: int
    scheduler: dict
    extra: dict
    moments: dict[str, dict[str, torch.Tensor]]  # canonical name -> {"exp_avg", "exp_avg_sq"}: full
    step: torch.Tensor
    group_options: dict[bool, dict]  # decayed? -> the source's param-group options (lr, betas, ...)
    ema: dict[str, torch.Tensor] | None = None  # canonical name -> full EMA (training.ema_decay runs)

    def shard_state(
        self, local_model: dict[str, torch.Tensor], model_cfg: ModelConfig, coords, config_yaml: str
    ) -> dict:
        """The ``model_optim_rng.pt`` contents of the rank at ``coords`` in the new layout."""
        order = position_names(local_model)
        state = {}
        for i, name in enumerate(order):
            state[i] = {"step": self.step.clone()}
            for key in MOMENTS:
                state[i][key] = shard_tensor(self.moments[name][key], name, model_cfg, coords).clone()
        groups, start = [], 0
        for decayed in (True, False):
            members = [n for n in order if no_weight_decay(n, local_model[n]) != decayed]
            if members:
                groups.append(
                    {**self.group_options[decayed], "params": list(range(start, start + len(members)))}
                )
                start += len(members)
        out = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "model": local_model,
            "optimizer": {"state": state, "param_groups": groups},
            "scheduler": self.scheduler,
            "config": config_yaml,
            "extra": self.extra,
        }
        if self.ema is not None:  # resharded with each weight's own rule, like the moments
            out["ema"] = {n: shard_tensor(self.ema[n], n, model_cfg, coords).clone() for n in local_model}
        return out


def _plain_local_states(optim: dict, model_state: dict) -> tuple[dict, torch.Tensor | None, dict]:
    """``name -> {moment: local tensor}``, the step and the group options of a plain optimizer."""
    names = position_names(model_state)
    local = {names[i]: values for i, values in optim["state"].items()}
    step = next(iter(local.values()))["step"] if local else None
    groups = {}
    for group in optim["param_groups"]:
        first = names[group["params"][0]]
        groups[not no_weight_decay(first, model_state[first])] = {
            k: v for k, v in group.items() if k != "params"
        }
    return local, step, groups


def _distributed_local_states(
    it_dir: Path, dims, rank: int, model_state: dict
) -> tuple[dict, torch.Tensor, dict]:
    """The same, assembled from the distributed optimizer's shard files of every dp rank."""
    sources = optimizer_shard_sources(it_dir, dims, rank)
    flat = assemble_piece_states(sources, {n: t.numel() for n, t in model_state.items()})
    local, step = {}, None
    for name, tensor in model_state.items():
        entry = flat.get(name)
        if entry is None or not bool(entry["covered"].all()):
            raise CheckpointError(f"{it_dir}: the distributed-optimizer shard files miss states of {name}")
        local[name] = {key: entry[key].view_as(tensor) for key in MOMENTS}
        step = entry["step"]
    inner = sources[0][2]["optimizer"]["param_groups"]  # the shard's AdamW: decayed group first
    groups = {True: {k: v for k, v in inner[0].items() if k != "params"}}
    groups[False] = {**{k: v for k, v in inner[-1].items() if k != "params"}, "weight_decay": 0.0}
    return local, step, groups


def read_training_state(
    root: str | Path, iteration: int | None = None, progress=lambda _s: None
) -> tuple[Config, dict[str, torch.Tensor], ResumeState]:
    """Weights and optimizer states of a training checkpoint of any layout, as full tensors.

    Plain-optimizer states are read from the shard files; distributed-optimizer states are first
    reassembled from every data-parallel rank's ``distrib_optim_dp*.pt``. The result is a plain
    optimizer's state in the new layout (which also resumes with the distributed optimizer on).

    Raises:
        CheckpointError: a model-only checkpoint, or shards that do not fit together.
    """
    cfg, it_dir, dims, states = read_shard_states(root, iteration, progress)
    weights: dict[str, dict[int, torch.Tensor]] = {}
    emas: dict[str, dict[int, torch.Tensor]] = {}  # the EMA of the weights, when every shard has one
    moments: dict[str, dict[str, dict[int, torch.Tensor]]] = {key: {} for key in MOMENTS}
    options: dict[bool, dict] = {}
    step = None
    for rank, state in states.items():
        optim = state["optimizer"]
        if optim is None:
            raise CheckpointError(
                f"{it_dir}: holds no optimizer state; --with-optimizer needs a trained checkpoint"
            )
        for name, tensor in state["model"].items():
            weights.setdefault(name, {})[rank] = tensor
        for name, tensor in (state.get("ema") or {}).items():
            emas.setdefault(name, {})[rank] = tensor
        if "distributed_optimizer" in optim:
            local, step, groups = _distributed_local_states(it_dir, dims, rank, state["model"])
        else:
            local, step, groups = _plain_local_states(optim, state["model"])
        for name, values in local.items():
            for key in MOMENTS:
                moments[key].setdefault(name, {})[rank] = values[key]
        for decayed, group in groups.items():
            options.setdefault(decayed, group)
    if step is None:
        raise CheckpointError(f"{it_dir}: the optimizer has not taken a step yet; nothing to carry over")
    options.setdefault(True, options.get(False, {}))
    options.setdefault(False, {**options[True], "weight_decay": 0.0})
    names = canonical_names(cfg.model)
    full_moments = {key: unshard_all(moments[key], names, cfg, dims, it_dir) for key in MOMENTS}
    first = states[min(states)]
    with_ema = all(state.get("ema") is not None for state in states.values())
    resume = ResumeState(
        iteration=int(first["iteration"]),
        consumed_samples=int(first["consumed_samples"]),
        scheduler=first["scheduler"],
        extra=first.get("extra", {}),
        moments={n: {key: full_moments[key][n] for key in MOMENTS} for n in names},
        step=step,
        group_options=options,
        ema=unshard_all(emas, names, cfg, dims, it_dir) if with_ema else None,
    )
    return cfg, unshard_all(weights, names, cfg, dims, it_dir), resume

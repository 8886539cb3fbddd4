"""Carry AdamW states, schedule and data position across a (tp, pp, ep) layout change.

Adam's moments have the shape of their parameter, so they are resharded with the parameter's own
shard rule (``parallel.sharding``): reassembled to canonical full tensors from every shard file,
then cut for each rank of the new layout. The plain optimizer's state is indexed by position, in
the order ``optimizer.param_groups`` builds (decayed parameters in model order, then the others),
which is how positions are turned back into canonical names here.

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
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.convert import read_shard_states, unshard_all
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
        return {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "model": local_model,
            "optimizer": {"state": state, "param_groups": groups},
            "scheduler": self.scheduler,
            "config": config_yaml,
            "extra": self.extra,
        }


def read_training_state(
    root: str | Path, iteration: int | None = None, progress=lambda _s: None
) -> tuple[Config, dict[str, torch.Tensor], ResumeState]:
    """Weights and optimizer states of a training checkpoint of any layout, as full tensors.

    Raises:
        CheckpointError: model-only or distributed-optimizer checkpoints (their moments are not
            stored per parameter here), or shards that do not fit together.
    """
    cfg, it_dir, dims, states = read_shard_states(root, iteration, progress)
    weights: dict[str, dict[int, torch.Tensor]] = {}
    moments: dict[str, dict[str, dict[int, torch.Tensor]]] = {key: {} for key in MOMENTS}
    options: dict[bool, dict] = {}
    step = None
    for rank, state in states.items():
        optim = state["optimizer"]
        if optim is None or "distributed_optimizer" in optim:
            kind = "no optimizer state" if optim is None else "a distributed-optimizer state"
            raise CheckpointError(
                f"{it_dir}: holds {kind}; --with-optimizer needs a checkpoint of the plain optimizer"
            )
        names = position_names(state["model"])
        for name, tensor in state["model"].items():
            weights.setdefault(name, {})[rank] = tensor
        for position, values in optim["state"].items():
            for key in MOMENTS:
                moments[key].setdefault(names[position], {})[rank] = values[key]
            step = values["step"]
        for group in optim["param_groups"]:
            first = names[group["params"][0]]
            decayed = not no_weight_decay(first, state["model"][first])
            options[decayed] = {k: v for k, v in group.items() if k != "params"}
    if step is None:
        raise CheckpointError(f"{it_dir}: the optimizer has not taken a step yet; nothing to carry over")
    options.setdefault(True, options.get(False, {}))
    options.setdefault(False, {**options[True], "weight_decay": 0.0})
    names = canonical_names(cfg.model)
    full_moments = {key: unshard_all(moments[key], names, cfg, dims, it_dir) for key in MOMENTS}
    first = states[min(states)]
    resume = ResumeState(
        iteration=int(first["iteration"]),
        consumed_samples=int(first["consumed_samples"]),
        scheduler=first["scheduler"],
        extra=first.get("extra", {}),
        moments={n: {key: full_moments[key][n] for key in MOMENTS} for n in names},
        step=step,
        group_options=options,
    )
    return cfg, unshard_all(weights, names, cfg, dims, it_dir), resume

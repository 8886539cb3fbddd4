"""Apply tensor/sequence/expert parallelism to a plain model, then materialize or load its shards.

Typical use (every rank)::

    dims = ParallelDims.from_config(cfg.parallel, world_size); dims.create_groups()
    model = build_model(cfg.model, device="meta", layer_ids=..., ...)
    parallelize(model, dims, cfg.parallel)            # swaps modules; parameters stay on meta
    materialize_local(model, dims, seed, device)      # allocate + init local shards only
    # or: load_full_state_dict(model, full_sd, dims)  # slice full weights into the shards
"""

from __future__ import annotations

import re

import torch
from torch import nn

from megatron_lite.parallel.context import context_parallel_of
from megatron_lite.parallel.dims import validate_layout
from megatron_lite.parallel.init import init_full_tensor, init_local_tensor
from megatron_lite.parallel.sharding import shard_tensor, sharding_table
from megatron_lite.parallel.styles import LinearLayers, ParallelState, Style, plan_from_table


def _pattern(key: str) -> re.Pattern:
    """Plan keys are module names where ``*`` stands for one name component (a layer index)."""
    return re.compile(re.escape(key).replace(r"\*", r"[^.]+"))


def default_plan(model_cfg) -> dict[str, Style]:
    """The plan derived from the model family's sharding table (``parallel.styles.plan_from_table``)."""
    return plan_from_table(sharding_table(model_cfg))


def parallelize(
    model: nn.Module,
    dims,
    parallel_cfg,
    plan: dict[str, Style] | None = None,
    linears: LinearLayers | None = None,
) -> nn.Module:
    """Swap the modules of ``model`` for tensor/sequence/expert-parallel ones, in place.

    Args:
        model: a plain ``Transformer`` (or pipeline stage), typically on the meta device.
        dims: ``ParallelDims`` with ``create_groups()`` done.
        parallel_cfg: ``ParallelConfig`` (``sequence_parallel``, ``moe_dispatcher``).
        plan: module-name pattern -> style, applied in the plan's order; default: the one derived
            from the family's sharding table.
        linears: the tensor-parallel layer classes the styles install (default ``LinearLayers()``).

    Returns:
        ``model``, with ``model.parallel_state`` (a ``ParallelState``) and ``model.vocab_parallel``.
    """
    cfg = model.cfg
    expected = validate_layout(cfg, parallel_cfg, dims.world_size)
    got = (dims.tp, dims.pp, dims.ep, dims.etp, dims.cp)
    want = (expected.tp, expected.pp, expected.ep, expected.etp, expected.cp)
    if got != want:
        raise ValueError(f"dims (tp, pp, ep, etp, cp) = {got} do not match parallel_cfg {want}")
    if getattr(model, "parallel_state", None) is not None:
        raise RuntimeError("model is already parallelized")
    plan = default_plan(cfg) if plan is None else plan
    state = ParallelState(dims, parallel_cfg, cfg, linears=linears or LinearLayers())
    for key, style in plan.items():
        pattern = _pattern(key)
        targets = [(n, m) for n, m in model.named_modules() if pattern.fullmatch(n)]
        for name, module in targets:
            new = style.apply(name, module, state)
            if new is not None:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, new)
    model.parallel_state = state
    if dims.cp > 1:  # the attention core gathers K/V over the cp group
        model.context_parallel = context_parallel_of(dims)
    return model


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=requires_grad))


@torch.no_grad()
def materialize_local(
    model: nn.Module, dims, seed: int, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Allocate and initialise the local shard of every meta parameter.

    Values come from ``parallel.init``: a function of (seed, canonical name, canonical index)
    only, so every layout (and the plain single-process model) starts from the same weights.

    Args:
        model: parallelized model, or a plain one (then whole canonical tensors), on meta.
        dims: the ``ParallelDims`` (its ``local`` coordinates pick the shards).
        seed: base seed.
        device: where the shards live (values are generated there).
        dtype: parameter dtype (default: the meta parameter's dtype).
    """
    parallel = getattr(model, "parallel_state", None) is not None
    coords = dims.local
    for name, param in list(model.named_parameters()):
        if not param.is_meta:
            continue
        if parallel:
            values = init_local_tensor(name, model.cfg, coords, seed, device)
        else:
            values = init_full_tensor(name, model.cfg, seed, device)
        if tuple(values.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: initialised shape {tuple(values.shape)} != parameter shape {tuple(param.shape)}"
            )
        _set_parameter(model, name, values.to(dtype=dtype or param.dtype), param.requires_grad)
    return model


def local_part(model: nn.Module, name: str, full: torch.Tensor, dims) -> torch.Tensor:
    """What ``model`` holds of canonical ``full``: its shard when parallelized, else the whole tensor."""
    if getattr(model, "parallel_state", None) is None:
        return full
    return shard_tensor(full, name, model.cfg, dims.local)


@torch.no_grad()
def load_full_state_dict(
    model: nn.Module, full_sd: dict[str, torch.Tensor], dims, strict: bool = True
) -> list[str]:
    """Give every local parameter its shard of the full (canonical, unsharded) tensor.

    Keys of ``full_sd`` that this rank does not hold (other pipeline stages) are ignored.

    Args:
        model: parallelized or plain model (meta or materialized parameters).
        full_sd: canonical name -> full tensor (e.g. the single-process model's ``state_dict()``).
        dims: the ``ParallelDims``.
        strict: raise if a local parameter has no entry in ``full_sd``.

    Returns:
        The names that were loaded.
    """
    loaded = []
    for name, param in list(model.named_parameters()):
        if name not in full_sd:
            if strict:
                raise KeyError(f"load_full_state_dict: {name!r} missing from the state dict")
            continue
        local = local_part(model, name, full_sd[name], dims)
        if param.is_meta:
            _set_parameter(model, name, local.to(param.dtype).clone(), param.requires_grad)
        else:
            param.copy_(local)
        loaded.append(name)
    return loaded

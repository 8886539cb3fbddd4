"""AdamW with Megatron's weight-decay rule, fp32 main parameters, global-norm clipping, loss scaling.

The optimizer is apex ``FusedAdam`` when apex is importable and the parameters live on CUDA (this
is the only import of apex in the package, DESIGN.md principle 7), otherwise torch's fused AdamW
(available on CUDA and CPU in recent torch), otherwise its foreach implementation.

Mixed precision (``MainParamOptimizer``): with bf16/fp16 model weights the optimizer owns an fp32
main copy of every parameter; its gradient is the parameter's fp32 ``main_grad`` (a view of the
gradient buffer, ``parallel.grad_buffer``). AdamW steps the main copies, which are then copied
(cast) into the model's weights. With fp32 weights the plain AdamW steps the parameters directly.

Clipping works on ``NormGroup``s: each group is a list of gradients whose squared sum must be
added over some set of ranks (``all_reduce``). The caller puts each parameter in exactly one
group and leaves out copies that another rank already counts (e.g. a norm weight replicated over
tensor-parallel ranks is counted on tensor rank 0 only), so nothing is double-counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


def _apex_fused_adam() -> type | None:
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule: biases and 1-D parameters (norm weights) are not decayed."""
    return name.endswith(".bias") or param.ndim == 1


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split parameters into a decayed and a non-decayed group (empty groups are dropped)."""
    decay, plain = [], []
    for name, param in named_params:
        if param.requires_grad:
            (plain if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def position_names(model_state: dict[str, torch.Tensor]) -> list[str]:
    """Name of every position of a plain optimizer's state dict, in ``param_groups`` order.

    ``model_state`` is the model's state dict (trainable parameters in ``named_parameters`` order).
    """
    names = list(model_state)
    decay = [n for n in names if not no_weight_decay(n, model_state[n])]
    return decay + [n for n in names if no_weight_decay(n, model_state[n])]


def build_optimizer(model: nn.Module, opt_cfg) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters from an ``OptimizerConfig``.

    The learning rate here is only a placeholder: the scheduler sets it before every step.
    """
    return make_adamw(param_groups(model.named_parameters(), opt_cfg.weight_decay), opt_cfg)


def make_adamw(groups: list[dict], opt_cfg) -> torch.optim.Optimizer:
    """AdamW over ready-made param groups: apex FusedAdam on CUDA, else torch fused, else foreach."""
    kwargs = dict(lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused_adam = _apex_fused_adam() if devices == {"cuda"} else None
    if fused_adam is not None:
        return fused_adam(groups, adam_w_mode=True, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused kernel not built for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class MainParamOptimizer:
    """AdamW over fp32 main copies of low-precision model parameters (not sharded: every dp rank).

    Positions, groups and ``state_dict`` are those of ``build_optimizer`` over the model (its
    parameter order and weight-decay rule), so checkpoints of either optimizer load into the other.

    Args:
        model: the local model, still fp32 (its values become the main parameters exactly);
            every trainable parameter has a ``main_grad`` (``GradSync``).
        opt_cfg: ``OptimizerConfig``.
    """

    def __init__(self, model: nn.Module, opt_cfg):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.mains: dict[str, nn.Parameter] = {}
        for name, param in self.named:
            main = nn.Parameter(param.detach().float().clone())  # exact init values (model still fp32)
            main.grad = param.main_grad  # the fp32 gradient buffer slice
            self.mains[name] = main
        self.main_params = list(self.mains.values())
        self.optimizer = make_adamw(param_groups(self.mains.items(), opt_cfg.weight_decay), opt_cfg)

    @property
    def param_groups(self) -> list[dict]:
        """The inner AdamW's groups (the LR scheduler writes ``lr`` into them)."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the main gradients in place (they are views of the gradient buffers)."""
        for main in self.main_params:
            main.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Step the fp32 main parameters, then cast them into the model's weights."""
        self.optimizer.step()
        torch._foreach_copy_([p.data for _, p in self.named], self.main_params)

    def main_norm_groups(self, groups: list[NormGroup]) -> list[NormGroup]:
        """The trainer's norm groups over the main parameters (same members, same reductions)."""
        main_of = {id(p): self.mains[n] for n, p in self.named}
        return [
            NormGroup(
                [main_of[id(p)] for p in g.params],
                g.all_reduce,
                {id(main_of[k]): w for k, w in g.row_weights.items()},
                g.dp_group,
            )
            for g in groups
        ]

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the fp32 main values in place of the low-precision weights."""
        state = model.state_dict()
        state.update({name: main.detach() for name, main in self.mains.items() if name in state})
        return state

    @torch.no_grad()
    def load_main_state(self, model_state: dict[str, torch.Tensor]) -> None:
        """Take the main values from a (checkpoint's fp32) model state dict."""
        for name, main in self.mains.items():
            main.copy_(model_state[name].reshape(main.shape))

    def state_dict(self) -> dict:
        """The inner AdamW's state (the format of the plain optimizer's)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict`` (also a plain fp32 optimizer's)."""
        self.optimizer.load_state_dict(state)


@dataclass
class NormGroup:
    """Gradients whose squared norms are summed, then reduced by ``all_reduce`` (in place, SUM).

    Args:
        params: parameters this rank counts (their ``.grad`` is read).
        all_reduce: sums a scalar fp32 tensor over the ranks holding the other shards of these
            parameters; ``None`` on one process.
        row_weights: ``id(param) -> [rows]`` weights of each dim-0 row's squared sum, for tensors
            whose rows are partly held by several ranks of the group (weight ``1 / replicas``).
        dp_group: the data-parallel group over which the distributed optimizer shards these
            parameters' gradients (``dp_cp`` for dense, ``edp`` for expert parameters).
    """

    params: list[torch.Tensor] = field(default_factory=list)
    all_reduce: Callable[[torch.Tensor], None] | None = None
    row_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    dp_group: str = "dp_cp"


def global_grad_norm(groups: Sequence[NormGroup], device: torch.device | str) -> torch.Tensor:
    """L2 norm of all gradients over all groups and ranks, as an fp32 scalar tensor."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups:
        grads = [p.grad for p in group.params if p.grad is not None and id(p) not in group.row_weights]
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            sq = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().pow(2)
        for p in group.params:
            if p.grad is not None and id(p) in group.row_weights:
                rows = p.grad.float().pow(2).reshape(p.shape[0], -1).sum(dim=1)
                sq = sq + (rows * group.row_weights[id(p)]).sum()
        if group.all_reduce is not None:
            group.all_reduce(sq)  # every group reduces, even when empty here: collectives must match
        total = total + sq
    return total.sqrt()


def clip_grads(
    groups: Sequence[NormGroup],
    max_norm: float,
    device: torch.device | str,
    params: Sequence[torch.Tensor] | None = None,
) -> float:
    """Scale gradients so their global norm is at most ``max_norm`` (0 disables); return the norm.

    Args:
        groups: how the norm is computed (each shard counted once).
        max_norm: clipping threshold.
        device: where the norm is accumulated.
        params: every local parameter to scale (default: those in ``groups``). Replicas left out of
            the norm must still be scaled, or they would drift apart.

    Returns:
        The norm before clipping, as Megatron logs it. A non-finite norm is returned as is and
        nothing is scaled (the caller skips the step).
    """
    norm = global_grad_norm(groups, device)
    value = float(norm)
    if max_norm > 0 and math.isfinite(value):
        coeff = max_norm / (value + 1e-6)
        if coeff < 1.0:
            targets = params if params is not None else [p for g in groups for p in g.params]
            grads = [p.grad for p in targets if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
    return value


class DynamicLossScaler:
    """fp16 loss scaling: multiply the loss, unscale the gradients, back off on overflow.

    bf16 and fp32 use ``scale = 1`` and never change it. The overflow decision comes from the
    global gradient norm, which is already reduced over every rank, so all ranks agree on skipping.
    """

    def __init__(
        self,
        enabled: bool,
        initial_scale: float = 2.0**16,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ):
        self.enabled = enabled
        self.scale = initial_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good_steps = 0

    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        """Divide gradients by the current scale."""
        if self.scale != 1.0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """Halve on overflow; double after ``growth_interval`` clean steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.scale *= 2.0

    def state_dict(self) -> dict:
        """Scale and growth counter for resume."""
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``."""
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])

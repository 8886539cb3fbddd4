"""Exponential moving average (EMA) of the weights, in fp32, from the optimizer's main parameters.

``training.ema_decay`` (``d`` in [0, 1); None or 0 keeps no EMA): after every optimizer step that
is applied (not after an fp16 step skipped on overflow, which leaves the weights unchanged),

    ema = d * ema + (1 - d) * main_param

elementwise in fp32, where ``main_param`` is the fp32 value the optimizer stepped (the
mixed-precision main copy, never the bf16/fp16 weight it is cast to; with fp32 weights the
parameter itself). The EMA starts from the weights the run starts from (the initial values, or
the resumed checkpoint's main values when the checkpoint holds no EMA).

Layout: the EMA mirrors the optimizer's main parameters one to one. The plain optimizers hold
whole local parameters, so does the EMA; the distributed optimizer (ZeRO-1) holds this rank's
shard pieces only (``DistributedOptimizer.pieces``), and so does the EMA: 4 bytes per parameter
divided by the data-parallel size.

Checkpoints: like the fp32 main parameters, the EMA is saved as a full local model state dict
(canonical names, this rank's tp/pp/ep shards, fp32) under the key ``"ema"`` of the shard
writer's ``model_optim_rng.pt``; under the distributed optimizer the pieces are all-gathered over
their dp (edp) group at save time only. Loading cuts each rank's pieces out of it again, so a run
resumes with any data-parallel size, and converters read the EMA under the same names as the
weights (``tools/convert_checkpoint.py --weights ema``).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.training.distributed_optimizer import gather_sharded_params

STATE_KEY = "ema"  # the key of the EMA's model state dict in a checkpoint's model_optim_rng.pt


class WeightEMA:
    """fp32 EMA of the optimizer's main parameters (whole, or this rank's ZeRO-1 shard pieces).

    Args:
        decay: ``d`` of ``ema = d * ema + (1 - d) * main``, in [0, 1).
        optimizer: the run's optimizer (``MainParamOptimizer``, ``DistributedOptimizer`` or a plain
            torch optimizer over fp32 parameters).
        model: the local model (names of the plain optimizer's parameters).

    Raises:
        ValueError: a plain optimizer over parameters that are not fp32 (no main values to follow).
    """

    def __init__(self, decay: float, optimizer, model: nn.Module):
        self.decay = float(decay)
        self.pieces = getattr(optimizer, "pieces", None)  # DistributedOptimizer: this rank's shards
        self.grad_sync = getattr(optimizer, "grad_sync", None)
        if self.pieces is not None:
            self.names = [p.name for p in self.pieces]
            sources = [p.shard for p in self.pieces]  # fp32 main values of param.view(-1)[lo:hi]
        elif hasattr(optimizer, "mains"):  # MainParamOptimizer: fp32 copies of whole parameters
            self.names, sources = list(optimizer.mains), list(optimizer.mains.values())
        else:  # plain AdamW steps the (fp32) parameters themselves
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.names, sources = [n for n, _ in named], [p for _, p in named]
        bad = [n for n, s in zip(self.names, sources) if s.dtype != torch.float32]
        if bad:
            raise ValueError(f"training.ema_decay: {bad[0]} has no fp32 main values to average")
        self.sources = [s.detach() for s in sources]
        self.values = [s.detach().clone() for s in sources]  # the EMA, fp32, same shapes

    @torch.no_grad()
    def update(self) -> None:
        """``ema = d * ema + (1 - d) * main`` for every tensor (call after an applied step)."""
        if not self.values:
            return
        torch._foreach_mul_(self.values, self.decay)
        torch._foreach_add_(self.values, self.sources, alpha=1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current main values."""
        torch._foreach_copy_(self.values, self.sources)

    @torch.no_grad()
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The EMA as ``model.state_dict()`` with fp32 EMA values (all ranks call it: ZeRO-1 gathers).

        Entries that are not trainable parameters keep the model's values.
        """
        state = dict(model.state_dict())
        if self.pieces is None:
            state.update({name: v.clone() for name, v in zip(self.names, self.values)})
            return state
        state.update(self._gather_pieces())
        return state

    def _gather_pieces(self) -> dict[str, torch.Tensor]:
        """Whole local parameters from the dp ranks' pieces: one fp32 all-gather per bucket."""
        mine = {(p.name, p.lo): v for p, v in zip(self.pieces, self.values)}
        return gather_sharded_params(self.grad_sync, mine, tag="ema")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the EMA from ``state_dict``'s output (cutting this rank's pieces under ZeRO-1).

        Raises:
            ValueError: ``state`` lacks a parameter or holds one of another size.
        """
        for i, name in enumerate(self.names):
            if name not in state:
                raise ValueError(f"the EMA state has no entry for {name}")
            saved = state[name].reshape(-1)
            piece = self.pieces[i] if self.pieces is not None else None
            want = piece.param.numel() if piece is not None else self.values[i].numel()
            if saved.numel() != want:
                raise ValueError(f"the EMA of {name} has {saved.numel()} elements, not {want}")
            if piece is not None:  # this rank's range of the flattened parameter
                saved = saved[piece.lo : piece.hi]
            self.values[i].copy_(saved.view_as(self.values[i]))


def build_ema(cfg, optimizer, model: nn.Module) -> WeightEMA | None:
    """The run's ``WeightEMA``, or None when ``training.ema_decay`` is unset or 0.

    Build it after the checkpoint is loaded: the average starts from the optimizer's main values.
    """
    decay = cfg.training.ema_decay
    if not decay:
        return None
    return WeightEMA(decay, optimizer, model)


def restore_ema(ema: WeightEMA | None, resumed: dict | None, say) -> None:
    """Load a resumed checkpoint's EMA into ``ema``; say so when the checkpoint has none.

    Args:
        ema: this run's EMA (None: off; a checkpoint's EMA is then ignored).
        resumed: ``checkpoint.load``'s result, or None when nothing was loaded.
        say: line sink.

    Raises:
        CheckpointError: the stored EMA does not fit this model.
    """
    if ema is None or resumed is None:
        return
    if resumed.get("ema") is None:
        say(" > training.ema_decay: the checkpoint holds no EMA; it starts from the loaded weights")
        return
    try:
        ema.load_state_dict(resumed["ema"])
    except (RuntimeError, ValueError) as exc:
        from megatron_lite.training.checkpoint import CheckpointError

        where = resumed["path"]
        raise CheckpointError(f"checkpoint file {where}: the EMA does not fit this run: {exc}") from None

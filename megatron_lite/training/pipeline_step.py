"""The trainer's side of pipeline parallelism: schedules, executors, the loss on the last stage.

``Trainer`` uses a :class:`PipelineStep` instead of ``forward_backward`` when
``parallel.pipeline > 1``. The loss normalisation is the unpipelined one (see ``trainer.py``):
each microbatch back-propagates ``sum(mask * token_loss) / N`` (times the fp16 loss scale) on the
last stage, and MoE layers weigh their aux losses by ``loss_scale / num_microbatches`` wherever
they sit. The results are summed over the pipeline group, so every rank (the logging rank, the
last one, included) holds the loss. An objective (``objectives.py``) replaces the masked
token loss on the last stage; its metrics stay there until ``Objective.finish_step`` sums them
over the pipeline group.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.parallel.zero import chunk_gathers
from megatron_lite.pipeline.executor import PipelineExecutor, warm_up
from megatron_lite.pipeline.schedules import build_schedule, forward_only
from megatron_lite.pipeline.stages import activation_shape, model_chunks
from megatron_lite.training.model_setup import masked_loss_sum
from megatron_lite.training.runtime import DTYPES, Runtime


class PipelineStep:
    """Forward/backward (and forward-only evaluation) of one global batch through the pipeline.

    Args:
        cfg: the run's config (``parallel.schedule``, ``virtual_pipeline``, shapes).
        runtime: this rank's runtime (pipeline group, device, precision).
        model: this rank's model (all layers of its chunks; see ``pipeline.stages``).
        grad_sync: the gradient buffers; under ZeRO-3 the executors gather each chunk's weights.
        objective: the training objective (None: the masked token loss).
    """

    def __init__(self, cfg: Config, runtime: Runtime, model: nn.Module, grad_sync=None, objective=None):
        self.cfg, self.runtime, self.model, self.grad_sync = cfg, runtime, model, grad_sync
        self.objective = objective
        dims = runtime.dims
        self.pp_rank, self.group = dims.local.pp, dims.group("pp")
        self.chunks = model_chunks(model, cfg, self.pp_rank)
        self.shape = activation_shape(cfg, dims.tp)
        if cfg.training.objective == "dpo":  # micro_batch_size counts pairs: two rows each
            self.shape = (2 * self.shape[0], *self.shape[1:])
        # Hidden states and their gradients travel in the compute dtype (bf16 under bf16 training:
        # half the bytes of fp32), as in Megatron. With bf16 weights the residual stream is bf16
        # already, so the pipelined run still computes what one process does.
        self.dtype = DTYPES[runtime.precision]
        self._executors: dict[tuple[str, int], PipelineExecutor] = {}
        warm_up(self.group, runtime.device)

    def _executor(self, kind: str, num_microbatches: int) -> PipelineExecutor:
        key = (kind, num_microbatches)
        if key not in self._executors:
            par = self.cfg.parallel
            if kind == "train":
                schedule = build_schedule(par.schedule, par.pipeline, par.virtual_pipeline, num_microbatches)
            else:
                schedule = forward_only(par.pipeline, par.virtual_pipeline, num_microbatches)
            self._executors[key] = PipelineExecutor(
                schedule[self.pp_rank],
                self.chunks,
                self.group,
                self.shape,
                self.dtype,
                self.runtime.device,
                gathers=chunk_gathers(self.grad_sync, schedule[self.pp_rank]),
            )
        return self._executors[key]

    def forward_backward(
        self, microbatches: list, loss_weight: float, grad_scale: float = 1.0
    ) -> torch.Tensor:
        """Accumulate the gradients of one global batch; same contract as ``trainer.forward_backward``.

        Returns:
            Detached fp32 ``[3]`` on every rank: summed masked token losses, and the MoE
            load-balancing and z losses averaged over layers and microbatches.
        """
        for layer in self.model.moe_layers():
            layer.aux_loss_scale = grad_scale / len(microbatches)
        scale = loss_weight * grad_scale

        def loss_fn(logits, mb):
            if self.objective is not None:
                loss_sum = self.objective.loss_sum(logits, mb, self.model)
            else:
                loss_sum = masked_loss_sum(logits, mb.labels, mb.loss_mask, self.model)
            return loss_sum * scale, loss_sum.detach()

        return self._executor("train", len(microbatches)).run(microbatches, loss_fn)

    @torch.no_grad()
    def forward(self, microbatches: list, loss_fn) -> torch.Tensor:
        """Forward only with a custom ``loss_fn(logits, mb) -> (objective, report)`` on the last stage.

        Returns the executor's ``[3]`` totals (the summed reports first), on every rank.
        """
        return self._executor("eval", len(microbatches)).run(microbatches, loss_fn)

    @torch.no_grad()
    def loss_sum(self, microbatches: list) -> torch.Tensor:
        """Forward only: ``sum(mask * token_loss)`` (or the objective's loss sum) over the microbatches."""

        def loss_fn(logits, mb):
            if self.objective is not None:
                loss_sum = self.objective.loss_sum(logits, mb, self.model)
            else:
                loss_sum = masked_loss_sum(logits, mb.labels, mb.loss_mask, self.model)
            return loss_sum, loss_sum

        return self._executor("eval", len(microbatches)).run(microbatches, loss_fn)[0]

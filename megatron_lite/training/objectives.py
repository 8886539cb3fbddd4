"""Training objectives (``training.objective``): pretrain, sft and dpo.

The trainer asks its objective for three things per iteration: the denominator of the global
batch's loss (``denominator``), each microbatch's un-normalised loss sum (``loss_sum``, on the
last pipeline stage) and the metrics of the iteration (``finish_step``).

* ``pretrain``: the mean token cross entropy over the loss-mask tokens (the normalisation rules
  of ``trainer.py``: ``N`` = mask tokens of the global batch).
* ``sft``: the same loss; the data must store loss masks (``--instruction`` preprocessing masks
  the prompts), which ``training.data.build_datasets`` checks before the run starts.
* ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs. A
  microbatch of ``P`` pairs holds ``2P`` rows, the chosen response at row ``2i`` and the rejected
  one at ``2i + 1`` (``data.preference``), so a pair never straddles microbatches, data-parallel
  ranks or pipeline microbatches. The loss of a pair is

      -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

  with ``pi``/``ref`` the summed log-probabilities of the response tokens (mask = 1) under the
  policy and the reference model. DPO normalises per pair, not per token: the objective is the
  mean over the ``P_total`` pairs of the global batch, so the trainer's denominator is the pair
  count (all-reduced over data parallelism) and each microbatch back-propagates
  ``sum_pairs loss / P_total``; the data-parallel gradient SUM then equals one process's gradient.

Reference log-probabilities are precomputed into the dataset: one forward-only pass of the
reference model (the starting weights, as DPO prescribes for an SFT'd model) writes the summed
log-probabilities of every sequence to a sidecar ``<prefix>_ref_logps.npy`` (``reference.py``).
Why not a frozen copy in memory (TRL's default, NeMo-Aligner keeps the reference weights on the
host and swaps them in): a second 7B model costs as much memory as the policy's weights on every
rank and a third more forward compute at every step, while the pass costs one forward per pair
once. It also needs nothing from the parallel layout (the sidecar is data, read like tokens),
and a resumed run reads the same numbers. The price is flexibility: the reference is always the
starting weights (another reference model is not supported), and an on-policy variant
(regenerated pairs) would need a fresh pass per round. TRL offers the same choice as
``precompute_ref_log_probs``.

Under tensor parallelism the vocab-parallel cross entropy gives per-token log-probabilities
without gathering the logits (equal on every tp rank); under pipeline parallelism the logps and
the loss are computed on the last stage and the metrics are summed over the pipeline group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import Config
from megatron_lite.training.model_setup import masked_loss_sum

OBJECTIVES = ("pretrain", "sft", "dpo")


def token_logps(logits: torch.Tensor, labels: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` in fp32 (with graph).

    Args:
        logits: ``[b, s, V]`` (or ``[b, s, V / tp]`` vocab-sharded for a parallelized model).
        labels: ``[b, s]`` int64 target ids.
        model: the (local) model; its ``parallel_state`` selects the vocab-parallel path.

    Returns:
        ``[b, s]`` fp32, equal on every tensor-parallel rank.
    """
    state = getattr(model, "parallel_state", None)
    if state is not None:
        from megatron_lite.parallel.comm import group_rank
        from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy

        group = state.dims.group("tp")
        start = group_rank(group) * logits.shape[-1]
        return -vocab_parallel_cross_entropy(logits, labels, group, start, state.model_cfg.vocab_size)
    b, s, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * s, v), labels.reshape(b * s), reduction="none")
    return -ce.view(b, s)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, model: nn.Module
) -> torch.Tensor:
    """Summed log-probabilities of the masked (response) tokens of each row: fp32 ``[b]``."""
    return (token_logps(logits, labels, model) * loss_mask.float()).sum(dim=-1)


def dpo_loss(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss of pairs laid out as rows ``2i`` (chosen) and ``2i + 1`` (rejected).

    Args:
        policy_logps: fp32 ``[2P]`` summed response log-probabilities under the policy (with graph).
        reference_logps: fp32 ``[2P]`` the same under the reference model.
        beta: ``training.dpo_beta``.

    Returns:
        (losses ``[P]`` with graph, chosen rewards ``[P]``, rejected rewards ``[P]``), the rewards
        ``beta * (pi - ref)`` detached.
    """
    ratios = policy_logps - reference_logps.to(policy_logps)  # [2P]
    chosen, rejected = ratios[0::2], ratios[1::2]  # [P] each
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


class Objective:
    """Token-mean cross entropy over the loss mask (pretrain and sft)."""

    metric_names: tuple[str, ...] = ()
    loss_name = "lm loss"  # what validation lines call the loss
    rows = 1  # sequences per sample (throughput counts rows * seq_length tokens per sample)

    def __init__(self, cfg: Config):
        self.name = cfg.training.objective

    def denominator(self, microbatches: list) -> torch.Tensor:
        """This rank's share of the loss denominator (loss-mask tokens): fp32 ``[1]``."""
        return sum(b.loss_mask.sum() for b in microbatches).to(torch.float32).reshape(1)

    def loss_sum(self, logits: torch.Tensor, batch, model: nn.Module) -> torch.Tensor:
        """The microbatch's un-normalised loss (fp32 scalar with graph)."""
        return masked_loss_sum(logits, batch.labels, batch.loss_mask, model)

    def start_step(self, device: torch.device) -> None:
        """Reset the per-iteration metric sums."""

    def finish_step(self, runtime, denominator: float) -> dict[str, float]:
        """The iteration's metrics, equal on every rank."""
        return {}


class DPOObjective(Objective):
    """DPO over paired rows (see the module docstring); reports TRL's reward metrics."""

    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")
    loss_name = "dpo loss"
    rows = 2

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.beta = cfg.training.dpo_beta
        self._sums = torch.zeros(len(self.metric_names))

    def denominator(self, microbatches: list) -> torch.Tensor:
        """Pairs of this rank's microbatches: fp32 ``[1]``."""
        return torch.tensor([sum(b.tokens.shape[0] // 2 for b in microbatches)], dtype=torch.float32)

    def loss_sum(self, logits: torch.Tensor, batch, model: nn.Module) -> torch.Tensor:
        """Summed DPO loss of the microbatch's pairs; accumulates the reward metrics."""
        if batch.ref_logps is None:
            raise RuntimeError("training.objective dpo: the batch carries no reference log-probabilities")
        if batch.tokens.shape[0] % 2:
            raise RuntimeError(f"dpo batches hold pairs of rows, got {batch.tokens.shape[0]} rows")
        policy = sequence_logps(logits, batch.labels, batch.loss_mask, model)  # [2P]
        losses, chosen, rejected = dpo_loss(policy, batch.ref_logps.reshape(-1), self.beta)
        stats = torch.stack(
            [chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum()]
        )
        self._sums = self._sums.to(stats.device) + stats
        return losses.sum()

    def start_step(self, device: torch.device) -> None:
        self._sums = torch.zeros(len(self.metric_names), device=device)

    def finish_step(self, runtime, denominator: float) -> dict[str, float]:
        """Reward metrics averaged over the global batch's pairs (summed over pp, then dp)."""
        sums = self._sums.to(runtime.device)
        if runtime.distributed and runtime.dims.pp > 1:  # only the last stage computed them
            from megatron_lite.parallel import comm

            comm.all_reduce(sums, runtime.dims.group("pp"))
        sums = runtime.all_reduce_dp(sums) / max(denominator, 1.0)
        return dict(zip(self.metric_names, (float(v) for v in sums), strict=True))


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``training.objective``."""
    return DPOObjective(cfg) if cfg.training.objective == "dpo" else Objective(cfg)

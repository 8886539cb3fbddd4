"""Cross entropy over a vocabulary split across tensor-parallel ranks.

Each rank holds logits for its slice ``[vocab_start, vocab_start + V_local)`` of the padded
vocabulary. The loss needs three all-reduces over the TP group (Megatron's scheme): the max
(for stability), the target logit (held by exactly one rank) and the sum of exponentials. The
full-vocabulary logits never exist on one rank. Columns at or beyond ``real_vocab_size`` are
vocabulary padding and are excluded from the softmax, so padding never changes the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm import all_reduce_, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, real_vocab_size):
        x = logits.float()  # [b, s, Vl]; a copy for low precision inputs, so the exp below is safe
        if x is logits:
            x = x.clone()
        v_local = x.shape[-1]
        n_real = max(0, min(v_local, real_vocab_size - vocab_start))
        if n_real < v_local:
            x[..., n_real:] = float("-inf")  # padding columns drop out of the softmax
        row_max = x.max(dim=-1).values  # [b, s]
        all_reduce_(row_max, group, op=dist.ReduceOp.MAX)
        x.sub_(row_max.unsqueeze(-1))

        local_labels = labels - vocab_start
        on_rank = (local_labels >= 0) & (local_labels < n_real)  # [b, s]
        local_labels = torch.where(on_rank, local_labels, 0)
        target = x.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)  # [b, s]
        # where, not a multiply: a rank holding only padding has -inf here and -inf * 0 is nan.
        target = torch.where(on_rank, target, 0.0)
        all_reduce_(target, group)

        x.exp_()
        sum_exp = x.sum(dim=-1)  # [b, s]
        all_reduce_(sum_exp, group)
        loss = torch.log(sum_exp) - target  # [b, s]

        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_labels, on_rank)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, on_rank = ctx.saved_tensors
        grad = softmax.clone()  # [b, s, Vl]; d loss / d logit = softmax - onehot(label)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -on_rank.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor, labels: torch.Tensor, group, vocab_start: int, real_vocab_size: int
) -> torch.Tensor:
    """Per-token cross entropy in fp32 from vocab-sharded logits.

    Args:
        logits_local: ``[b, s, V_local]`` logits of this rank's vocabulary slice (any float dtype).
        labels: ``[b, s]`` int64 global token ids. Ids outside ``[0, real_vocab_size)`` (e.g. -100)
            give a finite, meaningless loss: mask them out with the loss mask.
        group: the tensor-parallel group (None: one rank, the whole vocabulary is local).
        vocab_start: global id of this rank's first column.
        real_vocab_size: the unpadded vocabulary size; columns at or past it are ignored.

    Returns:
        ``[b, s]`` fp32 loss, equal on every rank of the group.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, labels, group, vocab_start, real_vocab_size)


def loss_fn(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    dims,
    vocab_size: int,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Masked mean language-model loss from vocab-parallel logits.

    Normalisation: the result is ``sum(loss * mask) / num_tokens``. With ``num_tokens`` None it is
    this microbatch's own ``sum(mask)`` (a per-microbatch mean). For gradient accumulation and
    data parallelism the trainer passes ``num_tokens`` = the number of unmasked tokens of the
    whole global batch (all microbatches, all dp ranks); gradients are then SUMMED over
    microbatches and over dp (``allreduce_gradients`` sums), which makes every token weigh the
    same whatever the split — identical to the single-process loss on the global batch. The
    reported loss is the sum of these values over microbatches and dp ranks.

    Args:
        logits: ``[b, s, V_local]`` output of the vocab-parallel output layer.
        labels: ``[b, s]`` target ids.
        loss_mask: ``[b, s]`` 1 for tokens that count, 0 otherwise.
        dims: ``ParallelDims`` with groups created (supplies the TP group and this rank's slice).
        vocab_size: the real (unpadded) vocabulary size.
        num_tokens: the denominator (see above).
    """
    group = dims.group("tp")
    vocab_start = group_rank(group) * logits.shape[-1]
    losses = vocab_parallel_cross_entropy(logits, labels, group, vocab_start, vocab_size)  # [b, s]
    mask = loss_mask.to(losses.dtype)
    total = (losses * mask).sum()
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1.0)
    return total / num_tokens

"""Communication primitives of tensor, sequence and expert parallelism, as autograd pairs.

Each function's backward is the collective that its forward's transpose needs:

    copy_to_region              fwd identity          bwd all-reduce
    reduce_from_region          fwd all-reduce        bwd identity
    scatter_to_sequence         fwd split dim         bwd all-gather
    gather_from_sequence        fwd all-gather dim    bwd reduce-scatter (or split)
    reduce_scatter_to_sequence  fwd reduce-scatter    bwd all-gather
    all_to_all                  fwd all-to-all        bwd reverse all-to-all
    all_gather_tokens           fwd all-gather-v d0   bwd reduce-scatter-v
    reduce_scatter_tokens       fwd reduce-scatter-v  bwd all-gather-v

Layers call only these. ``group=None`` means a group of one rank (no communication), so the
same layer code runs without torch.distributed. Sequence functions split ``dim`` (1 for the
batch-first ``[b, s, h]`` layout); token functions work on dim 0 with per-rank sizes.

Every collective of a training step (these pairs, the token dispatchers, the pipeline's
point-to-point batches, gradient reduction, the parameter all-gather, norms and loss sums) goes
through the thin wrappers below (``all_reduce``, ``all_gather_single``, ``reduce_scatter_single``,
``all_to_all_single``, ``batch_isend_irecv``). Inside ``with CommRecorder() as rec:`` each call
is noted as a :class:`CommRecord` (kind, tag, group size, dtype, bytes), so a test can check what
travels on the wires (e.g. that activations move in bf16) without wrapping torch.distributed.
The tag says what the payload is: ``activation`` (hidden states and their gradients, routed
tokens), ``grad`` (gradient reduction), ``param`` (parameter all-gather), ``main`` (fp32 main
parameters gathered for a checkpoint), ``stat`` (small scalars and routing metadata: losses,
norms, counts, split sizes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives; keep working on older releases too.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ---------------------------------------------------------------- recording


@dataclass(frozen=True)
class CommRecord:
    """One collective (or one point-to-point op) as issued by this rank.

    ``nbytes`` counts the whole logical tensor: the reduced tensor of an all-reduce, the gathered
    output of an all-gather, the input of a reduce-scatter or all-to-all, the message of a send or
    receive.
    """

    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send | recv
    tag: str  # activation | grad | param | main | stat
    group_size: int
    dtype: torch.dtype
    nbytes: int


# Active recorders, innermost last. Only recorders live here, never process-group state.
_RECORDERS: list[CommRecorder] = []


class CommRecorder:
    """Context manager that collects a :class:`CommRecord` for every wrapped collective inside it."""

    def __init__(self):
        self.records: list[CommRecord] = []

    def __enter__(self) -> CommRecorder:
        _RECORDERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _RECORDERS.remove(self)

    def summary(self) -> Counter:
        """``(kind, tag, dtype) -> total bytes`` over the recorded calls (for messages and benchmarks)."""
        out: Counter = Counter()
        for r in self.records:
            out[(r.kind, r.tag, str(r.dtype).removeprefix("torch."))] += r.nbytes
        return out


def _note(kind: str, tag: str, group, tensor: torch.Tensor) -> None:
    if _RECORDERS:
        nbytes = tensor.numel() * tensor.element_size()
        record = CommRecord(kind, tag, group_size(group), tensor.dtype, nbytes)
        for recorder in _RECORDERS:
            recorder.records.append(record)


# ---------------------------------------------------------------- thin wrappers (recorded)


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False, tag: str = "stat"):
    """``dist.all_reduce`` (in place), recorded; returns the work handle when ``async_op``."""
    _note("all_reduce", tag, group, tensor)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False, tag: str = "stat"):
    """Equal-size all-gather of ``inp`` into ``out`` (dim 0, group order), recorded."""
    _note("all_gather", tag, group, out)
    return _all_gather_single(out, inp, group=group, async_op=async_op)


def reduce_scatter_single(
    out: torch.Tensor,
    inp: torch.Tensor,
    group,
    op=dist.ReduceOp.SUM,
    async_op: bool = False,
    tag: str = "grad",
):
    """Sum ``inp`` over the group and keep this rank's equal share of dim 0 in ``out``, recorded."""
    _note("reduce_scatter", tag, group, inp)
    return _reduce_scatter_single(out, inp, op=op, group=group, async_op=async_op)


def all_to_all_single(
    out: torch.Tensor, inp: torch.Tensor, output_splits, input_splits, group, tag: str = "stat"
):
    """``dist.all_to_all_single`` (``None`` splits: equal), recorded."""
    _note("all_to_all", tag, group, inp)
    return dist.all_to_all_single(out, inp, output_splits, input_splits, group=group)


def batch_isend_irecv(ops: list, group, tag: str = "activation") -> list:
    """Post point-to-point ops as one batch (``dist.batch_isend_irecv``); each op is recorded."""
    for op in ops:
        _note("send" if op.op is dist.isend else "recv", tag, group, op.tensor)
    return dist.batch_isend_irecv(ops)


# ---------------------------------------------------------------- plain (non-autograd) helpers


def group_size(group) -> int:
    """Number of ranks in ``group`` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """Index of this process in ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, tag: str = "stat") -> torch.Tensor:
    """In-place all-reduce (no autograd); no-op on a one-rank group."""
    if group_size(group) > 1:
        all_reduce(tensor, group, op=op, tag=tag)
    return tensor


def all_gather_stack(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's equal-shape ``t`` stacked in group order -> ``[g, *t.shape]`` (no autograd)."""
    if group_size(group) == 1:
        return t.unsqueeze(0).clone()
    return _all_gather_dim0(t.reshape(1, -1), group, tag="stat").view(group_size(group), *t.shape)


def all_gather_sizes(n: int, group, device=None) -> list[int]:
    """Every rank's ``n`` (e.g. its token count), in group order."""
    if group_size(group) == 1:
        return [n]
    return all_gather_stack(torch.tensor([n], dtype=torch.int64, device=device), group).flatten().tolist()


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange a ``[g, ...]`` integer tensor: row j goes to rank j; returns rows from each source."""
    if group_size(group) == 1:
        return counts.clone()
    out = torch.empty_like(counts)
    all_to_all_single(out, counts.contiguous(), None, None, group)
    return out


def _all_gather_dim0(x: torch.Tensor, group, tag: str = "activation") -> torch.Tensor:
    """Equal-size all-gather along dim 0 -> ``[g * n, ...]``."""
    out = x.new_empty((group_size(group) * x.shape[0], *x.shape[1:]))
    all_gather_single(out, x.contiguous(), group, tag=tag)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group, tag: str = "activation") -> torch.Tensor:
    """Sum over ranks, then keep this rank's equal share of dim 0."""
    g = group_size(group)
    if x.shape[0] % g:
        raise ValueError(f"reduce-scatter: dim 0 ({x.shape[0]}) is not divisible by the group size ({g})")
    out = x.new_empty((x.shape[0] // g, *x.shape[1:]))
    reduce_scatter_single(out, x.contiguous(), group, tag=tag)
    return out


def _along(fn, x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Apply a dim-0 collective ``fn`` along ``dim`` (collectives need the split dim outermost)."""
    if dim == 0:
        return fn(x, group)
    return fn(x.movedim(dim, 0), group).movedim(0, dim).contiguous()


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    g, r = group_size(group), group_rank(group)
    if x.shape[dim] % g:
        raise ValueError(f"sequence dim ({x.shape[dim]}) is not divisible by the group size ({g})")
    return x.chunk(g, dim=dim)[r].contiguous()


def _gather_v(x: torch.Tensor, sizes: list[int], group, tag: str) -> torch.Tensor:
    """All-gather along dim 0 with per-rank sizes: pad to the largest, gather, drop the padding."""
    if len(set(sizes)) == 1:
        return _all_gather_dim0(x, group, tag)
    most = max(sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    full = _all_gather_dim0(padded, group, tag)  # [g * most, ...]
    return torch.cat([full[i * most : i * most + n] for i, n in enumerate(sizes)])


def _reduce_scatter_v(x: torch.Tensor, sizes: list[int], group, tag: str) -> torch.Tensor:
    """Sum ``x`` ``[sum(sizes), ...]`` over ranks; rank i keeps its ``sizes[i]`` rows."""
    if len(set(sizes)) == 1:
        return _reduce_scatter_dim0(x, group, tag)
    most = max(sizes)
    padded = x.new_zeros((len(sizes) * most, *x.shape[1:]))
    for i, part in enumerate(x.split(sizes)):
        padded[i * most : i * most + part.shape[0]] = part
    return _reduce_scatter_dim0(padded, group, tag)[: sizes[group_rank(group)]]


# ---------------------------------------------------------------- autograd pairs


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        return all_reduce_(grad, ctx.group, tag="activation"), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tag):
        return all_reduce_(x.clone(memory_format=torch.contiguous_format), group, tag=tag)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _along(_all_gather_dim0, grad, ctx.group, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _along(_all_gather_dim0, x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _along(_reduce_scatter_dim0, grad, ctx.group, ctx.dim), None, None, None
        return _split(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _along(_reduce_scatter_dim0, x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _along(_all_gather_dim0, grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        all_to_all_single(out, x.contiguous(), output_splits, input_splits, group, tag="activation")
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        splits = (ctx.input_splits, ctx.output_splits)  # the forward's, reversed
        all_to_all_single(out, grad.contiguous(), *splits, ctx.group, tag="activation")
        return out, None, None, None


class _AllGatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, tag):
        ctx.group, ctx.sizes, ctx.tag = group, sizes, tag
        return _gather_v(x, sizes, group, tag)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_v(grad, ctx.sizes, ctx.group, ctx.tag), None, None, None


class _ReduceScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.group, ctx.sizes = group, sizes
        return _reduce_scatter_v(x, sizes, group, "activation")

    @staticmethod
    def backward(ctx, grad):
        return _gather_v(grad.contiguous(), ctx.sizes, ctx.group, "activation"), None, None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: identity; backward all-reduces."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group, tag: str = "activation") -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce; backward identity.

    ``tag`` names the payload for :class:`CommRecorder` (``stat`` for MoE routing statistics).
    """
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group, tag)


def scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` (replicated -> sequence-sharded); backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group, dim)


def gather_from_sequence(x: torch.Tensor, group, dim: int = 1, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence chunks along ``dim``.

    Args:
        reduce_grad: the consumer is tensor-parallel (each rank's gradient is partial), so the
            backward reduce-scatters; False when the consumer is replicated (backward just splits).
    """
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group, dim, reduce_grad)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sum partial results and keep this rank's chunk of ``dim``; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group, dim)


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send ``x.split(input_splits)[j]`` to rank j; receive ``output_splits[j]`` rows from rank j (dim 0)."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_gather_tokens(x: torch.Tensor, sizes: list[int], group, tag: str = "activation") -> torch.Tensor:
    """Concatenate every rank's rows (rank i has ``sizes[i]``) along dim 0; backward reduce-scatters.

    ``tag`` names the payload for :class:`CommRecorder` (``stat`` for routing weights/indices).
    """
    return x if group_size(group) == 1 else _AllGatherTokens.apply(x, list(sizes), group, tag)


def reduce_scatter_tokens(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Sum ``x`` ``[sum(sizes), ...]`` over ranks; rank i keeps its ``sizes[i]`` rows; bwd all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterTokens.apply(x, list(sizes), group)

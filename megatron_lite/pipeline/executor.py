"""Walk one pipeline rank's action list: compute, batched point-to-point, autograd across stages.

The schedule (``schedules.py``) decides everything about order; this module only follows the
posting rule of ``communication.py``:

1. every maximal run of consecutive SEND/RECV actions is posted as ONE ``dist.batch_isend_irecv``,
   ops in list order (so the k-th send of a channel meets the k-th receive);
2. a compute action first waits for the batch that received its input (the whole batch, sends
   included: safe, and what NCCL does anyway);
3. a sent tensor stays referenced by its batch until the batch completes (polled after each
   compute action, waited at the end of the step);
4. :func:`warm_up` runs a collective on the pipeline group once before the first step.

Memory: a forward output is freed as soon as its send completed: the executor keeps only a 0-d
anchor of the output's autograd graph (``_StageBoundary``), through which the received gradient is
injected at backward time (what Megatron does by overwriting ``output.data``, with public autograd
API only). The received input lives until its backward produced the input gradient; the gradient
until its send completed. Nothing of a microbatch outlives its backward.

Data: every pipeline rank loads the same microbatches (``BatchStream`` slices by data-parallel
rank only), so the labels, the loss mask and the packed-sequence metadata (``position_ids``,
``cu_seqlens``, ``max_seqlen``) are local on every stage; only hidden states and their gradients
travel, with the fixed shape ``[b, s, h]`` (``[b, s/tp, h]`` under sequence parallel) and dtype
(the compute dtype: bf16 under bf16 training).

Backward: the last stage back-propagates the loss objective; the others call
``torch.autograd.backward(output, grad)`` with the received gradient. MoE layers attach their
auxiliary losses to their outputs, so each chunk's backward also back-propagates its own aux
losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.pipeline.actions import Action
from megatron_lite.pipeline.placement import is_first_stage, is_last_stage


class _GradSlot:
    """Holds the gradient received for one stage output until its backward runs."""

    grad: torch.Tensor | None = None


class _StageBoundary(torch.autograd.Function):
    """Cut between a stage output and the next stage: a 0-d anchor stands in for the output.

    The anchor keeps the output's graph alive without keeping its ``[b, s, h]`` values (nothing
    is saved for backward), so the output storage is released once the send that reads it is
    done. Back-propagating the anchor hands the slot's gradient to the output's graph.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, slot: _GradSlot) -> torch.Tensor:
        ctx.slot, ctx.dtype = slot, out.dtype
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, _anchor_grad: torch.Tensor):
        grad, ctx.slot.grad = ctx.slot.grad, None
        return grad.to(ctx.dtype), None


# loss_fn(logits, microbatch) -> (objective to back-propagate, detached scalar to report)
LossFn = Callable[[torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


def warm_up(group, device: torch.device | str) -> None:
    """One collective over the pipeline group (torch needs it before the first batched p2p)."""
    if group is not None:
        comm.all_reduce(torch.zeros(1, device=device), group)


@dataclass
class _Batch:
    """The requests of one ``batch_isend_irecv`` and the tensors they use."""

    works: list = field(default_factory=list)
    tensors: list = field(default_factory=list)

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.tensors = [], []

    def completed(self) -> bool:
        """True once every request finished (then the sent tensors are released)."""
        if all(work.is_completed() for work in self.works):
            self.wait()
            return True
        return False


@dataclass
class _Step:
    """Per-step bookkeeping, keyed by (chunk, microbatch) or (direction, chunk, microbatch)."""

    inputs: dict = field(default_factory=dict)  # received activation (leaf), until its backward
    outputs: dict = field(default_factory=dict)  # (anchor, slot) / loss objective, until backward
    received: dict = field(default_factory=dict)  # (dir, c, m) -> (buffer, batch) not yet consumed
    to_send: dict = field(default_factory=dict)  # (dir, c, m) -> tensor produced, not yet posted
    pending: list = field(default_factory=list)  # batches not known to be complete
    totals: torch.Tensor | None = None  # [4]: loss report sum, aux sum, z sum, number of aux terms


class PipelineExecutor:
    """Runs one pipeline rank's action list on its model chunks.

    Args:
        actions: this rank's actions (``build_schedule(...)[pp_rank]`` or ``forward_only(...)``);
            without any ``B`` action the executor runs forward only, without autograd graphs.
        chunks: one module per local virtual chunk; ``chunk(x, position_ids=, cu_seqlens=,
            max_seqlen=)`` takes token ids (first virtual stage) or hidden states and returns hidden
            states, or logits on the last virtual stage. ``chunk.moe_layers()``, if present, lists
            its MoE layers (their aux/z losses are reported).
        group: the pipeline-parallel process group (None: a pipeline of one rank).
        activation_shape: ``[b, s, h]`` of the hidden states between stages (``s/tp`` under SP).
        dtype: dtype in which hidden states and their gradients travel.
        device: where receive buffers are allocated.
        forward_context: context manager factory around chunk forwards (e.g. autocast).
        gathers: ZeRO-3 (``parallel.zero.ChunkGathers``): ``before(i)``/``after(i)`` each compute
            action ``i`` gather, prefetch and release the chunks' weights; None otherwise.
    """

    def __init__(
        self,
        actions: Sequence[Action],
        chunks: Sequence[nn.Module],
        group,
        activation_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
        forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        gathers=None,
    ):
        self.gathers = gathers
        self.actions, self.chunks, self.group = list(actions), list(chunks), group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.pp = dist.get_world_size(group) if group is not None else 1
        self.vpp = len(self.chunks)
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, torch.device(device)
        self.forward_context = forward_context
        self.forward_only = not any(a.kind == "B" for a in self.actions)
        bad = [a for a in self.actions if a.chunk >= self.vpp or (a.is_comm and not 0 <= a.peer < self.pp)]
        if bad:
            raise ValueError(
                f"pipeline rank {self.rank}: action {bad[0]} does not fit {self.vpp} chunk(s) and "
                f"{self.pp} pipeline rank(s)"
            )

    # ------------------------------------------------------------------ one step

    def run(self, microbatches: Sequence, loss_fn: LossFn) -> torch.Tensor:
        """Run every action of the list on ``microbatches``.

        Args:
            microbatches: objects with ``tokens``, ``position_ids``, ``cu_seqlens``, ``max_seqlen``
                (and whatever ``loss_fn`` reads), identical on every pipeline rank.
            loss_fn: on the last virtual stage, ``(logits, microbatch) -> (objective, report)``;
                the objective is back-propagated, the detached scalar report is summed.

        Returns:
            fp32 ``[3]`` on every rank of the pipeline group: the summed reports, and the MoE
            load-balancing and z losses averaged over MoE layers and microbatches (zeros for a
            dense model or forward only).
        """
        st = _Step(totals=torch.zeros(4, dtype=torch.float32, device=self.device))
        grad_mode = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with grad_mode:
            i = 0
            while i < len(self.actions):
                if self.actions[i].is_comm:
                    j = i
                    while j < len(self.actions) and self.actions[j].is_comm:
                        j += 1
                    self._post(st, self.actions[i:j])
                    i = j
                    continue
                action = self.actions[i]
                if self.gathers is not None:
                    self.gathers.before(i)
                if action.kind == "F":
                    self._forward(
                        st, action.chunk, microbatches[action.microbatch], action.microbatch, loss_fn
                    )
                else:
                    self._backward(st, action.chunk, action.microbatch)
                if self.gathers is not None:
                    self.gathers.after(i)
                st.pending = [b for b in st.pending if not b.completed()]
                i += 1
        for batch in st.pending:
            batch.wait()
        self._check_drained(st)
        return self._reduce_totals(st.totals)

    # ------------------------------------------------------------------ communication

    def _post(self, st: _Step, actions: Sequence[Action]) -> None:
        """Post consecutive SEND/RECV actions as one batch of isend/irecv."""
        batch, ops = _Batch(), []
        for a in actions:
            key = (a.kind[-1], a.chunk, a.microbatch)
            if a.is_send:
                if key not in st.to_send:
                    raise RuntimeError(f"pipeline rank {self.rank}: {a} before its tensor was produced")
                tensor = st.to_send.pop(key)
            else:
                tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # [b, s, h]
                st.received[key] = (tensor, batch)
            op = dist.isend if a.is_send else dist.irecv
            ops.append(dist.P2POp(op, tensor, group=self.group, group_peer=a.peer))
            batch.tensors.append(tensor)
        batch.works = comm.batch_isend_irecv(ops, self.group)
        st.pending.append(batch)

    def _take(self, st: _Step, direction: str, chunk: int, mb: int) -> torch.Tensor:
        """The received tensor for (direction, chunk, mb), after its batch completed."""
        key = (direction, chunk, mb)
        if key not in st.received:
            kind = "RECV_F" if direction == "F" else "RECV_B"
            raise RuntimeError(
                f"pipeline rank {self.rank}: chunk {chunk} microbatch {mb} needs a {kind} first"
            )
        tensor, batch = st.received.pop(key)
        batch.wait()
        return tensor

    # ------------------------------------------------------------------ compute

    def _forward(self, st: _Step, c: int, mb, m: int, loss_fn: LossFn) -> None:
        first, last = is_first_stage(self.rank, c), is_last_stage(self.rank, c, self.pp, self.vpp)
        if first:
            x = mb.tokens  # [b, s]
        else:
            x = self._take(st, "F", c, m)  # [b, s(/tp), h]
            if not self.forward_only:
                x.requires_grad_(True)
                st.inputs[(c, m)] = x
        with self.forward_context():
            out = self.chunks[c](
                x, position_ids=mb.position_ids, cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen
            )
        if not self.forward_only:
            self._moe_stats(st, self.chunks[c])
        if last:
            objective, report = loss_fn(out, mb)  # logits [b, s, V(/tp)] -> scalars
            st.totals[0] += report.detach().float().reshape(())
            if not self.forward_only:
                st.outputs[(c, m)] = objective
            return
        if tuple(out.shape) != self.shape:
            raise RuntimeError(
                f"pipeline rank {self.rank}: chunk {c} produced {tuple(out.shape)} but stages exchange "
                f"{self.shape} (micro batch, sequence (/tp under sequence parallel), hidden)"
            )
        if not self.forward_only:
            slot = _GradSlot()
            st.outputs[(c, m)] = (_StageBoundary.apply(out, slot), slot)  # not ``out`` itself
        st.to_send[("F", c, m)] = out.detach().to(self.dtype).contiguous()

    def _backward(self, st: _Step, c: int, m: int) -> None:
        out = st.outputs.pop((c, m))
        if is_last_stage(self.rank, c, self.pp, self.vpp):
            torch.autograd.backward(out)  # the scalar objective (loss + attached MoE aux losses)
        else:
            anchor, slot = out
            slot.grad = self._take(st, "B", c, m)  # [b, s(/tp), h]
            torch.autograd.backward(anchor)
        del out
        if not is_first_stage(self.rank, c):
            x = st.inputs.pop((c, m))
            grad_in = x.grad if x.grad is not None else torch.zeros_like(x)
            st.to_send[("B", c, m)] = grad_in.to(self.dtype).contiguous()

    @staticmethod
    def _moe_stats(st: _Step, chunk: nn.Module) -> None:
        """Add the chunk's MoE aux/z losses of the forward that just ran."""
        layers = chunk.moe_layers() if hasattr(chunk, "moe_layers") else []
        for layer in layers:
            if layer.last_aux_loss is not None:
                st.totals[1] += layer.last_aux_loss.float()
                st.totals[2] += layer.last_z_loss.float()
                st.totals[3] += 1

    # ------------------------------------------------------------------ end of step

    def _check_drained(self, st: _Step) -> None:
        left = {
            "inputs": st.inputs,
            "outputs": st.outputs,
            "received": st.received,
            "to_send": st.to_send,
        }
        left = {name: sorted(d) for name, d in left.items() if d}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the schedule left tensors behind: {left}")

    def _reduce_totals(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum over the pipeline group; -> [report sum, aux mean, z mean]."""
        if self.group is not None:
            comm.all_reduce(totals, self.group)
        count = totals[3].clamp(min=1.0)
        return torch.stack([totals[0], totals[1] / count, totals[2] / count])

"""ZeRO stages 2 and 3 on our own buffers: sharded gradients, and weights gathered per pipeline chunk.

``parallel.data_parallel_sharding`` (with ``parallel.distributed_optimizer true``):

- ``optimizer`` (ZeRO-1, ``training.distributed_optimizer``): fp32 main params and Adam states
  sharded; every rank holds the whole bf16 weights and fp32 main gradients.
- ``gradients`` (ZeRO-2): as ZeRO-1, but once a buffer's reduce-scatter is complete only this
  rank's shard of the fp32 gradients is kept (a compact ``grad_shard`` that the optimizer's pieces
  point into) and the full fp32 buffer's storage is released. The buffers are built per pipeline
  chunk; under pipeline parallelism the executor (:class:`ChunkGathers`) allocates a chunk's fp32
  buffer (zeroed) just before its first backward of the step and, after its last, completes its
  reduce-scatter (launched earlier by the hooks under ``overlap_grad_reduce``), copies the shard
  out and frees the buffer: a breadth-first rank holds one chunk's full fp32 gradients at a time.
  Without pipeline parallelism the one buffer lives from ``start_step`` to ``finish_grad_sync``.
- ``parameters`` (ZeRO-3): also the weights. Each rank keeps 1/dp of every bucket of the bf16 (or
  fp32) parameter buffer (``param_shard``); the optimizer writes its updated shard there. The
  buffers are built per pipeline chunk, so a chunk's weights are one flat buffer whose storage is
  allocated and all-gathered just before the chunk's first compute action of a run (a maximal
  sequence of this rank's compute actions on one chunk), and released (storage resized to 0: every
  parameter, and every tensor autograd saved from it, stays a view of the same storage) after the
  run's last action. When a run starts, the gather of the next run's chunk is launched
  asynchronously (prefetch), so at most two chunks' weights are resident. Under breadth-first a
  rank's actions on one chunk are contiguous for all microbatches of a pass, so each chunk is
  gathered once per forward pass and once per backward pass (once for both when they are adjacent,
  on the last stage); interleaved 1F1B alternates chunks every microbatch and gathers many times.

Why not FSDP2 (``torch.distributed.fsdp.fully_shard``, tried on a chunk under gloo, torch 2.13):
it shards plain modules fine, but it replaces every parameter by a sharded ``DTensor`` with its own
storage and runs its own reduce-scatter from its own post-backward hooks. That discards what the
rest of the framework is built on: (1) our parameters are views of one flat bf16 buffer per bucket
and our fp32 main gradients (``param.main_grad``) views of the grad buffers, which the distributed
optimizer's shard pieces, the clipping norm groups (tp/pp/ep/edp rules, KV row weights) and the
checkpoint shard files (flat bucket ranges, resharding to another dp) all address; (2) our
tensor/expert-parallel layers hold manually sharded plain tensors, not DTensors, and tp-partial
parameters (norms, routers) must be summed over tp as well as dp, expert parameters over edp, which
one FSDP mesh per unit does not express; (3) the pipeline executor calls each chunk's forward and
``torch.autograd.backward`` itself, across many microbatches, and the breadth-first point is to
decide per chunk run (from the schedule, which is data) when to gather and free, not per module
call. So ZeRO-2/3 are built on ``parallel.grad_buffer`` (``GradBuffer`` subclassed here) and the
executor calls :class:`ChunkGathers` around its compute actions.

Collectives: the parameter gathers are ``comm.all_gather_single`` with tag ``"param"`` (counted by
``CommRecorder`` in tests), over each buffer's dp group (edp for expert buffers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_lite.parallel import comm
from megatron_lite.parallel.grad_buffer import Bucket, GradBuffer

STAGES = {"optimizer": 1, "gradients": 2, "parameters": 3}


def _free(t: torch.Tensor) -> None:
    """Release ``t``'s storage (views keep pointing at the same, now empty, storage)."""
    if t.untyped_storage().nbytes() > 0:
        t.untyped_storage().resize_(0)


def _alloc(t: torch.Tensor) -> bool:
    """Give ``t``'s storage its full size again (uninitialized); True if it was released."""
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().nbytes() == nbytes:
        return False
    t.untyped_storage().resize_(nbytes)
    return True


class ShardedGradBuffer(GradBuffer):
    """A ``GradBuffer`` of one pipeline chunk that keeps only its dp shard (ZeRO-2/3).

    Args (beyond ``GradBuffer``'s):
        stage: 2 (gradients) or 3 (gradients and parameters).
        chunk: the pipeline chunk whose parameters this buffer holds.
    """

    def __init__(self, *args, stage: int, chunk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.chunk = stage, chunk
        n = self.data.numel() // self.dp_size
        self.grad_shard = torch.zeros(n, dtype=torch.float32, device=self.data.device)  # [numel/dp]
        self.param_shard: torch.Tensor | None = None  # [numel/dp] (stage 3, after ``cast_params``)
        self.gathering: list = []  # in-flight async parameter gathers (stage 3)
        # lazy: the executor allocates the fp32 buffer before the chunk's first backward and
        # finishes (reduces, keeps the shard, frees) after its last (``ChunkGathers``).
        self.lazy, self.finished = False, False

    # -------------------------------------------------------------- shard coordinates

    def compact(self, bucket: Bucket, a: int) -> int:
        """Offset in the compact shard tensors of buffer element ``a`` (inside ``bucket``'s shard)."""
        return bucket.start // self.dp_size + (a - self.shard_range(bucket)[0])

    def grad_view(self, bucket: Bucket, a: int, b: int) -> torch.Tensor:
        """The reduced gradient of buffer elements ``[a, b)`` (inside this rank's shard)."""
        lo = self.compact(bucket, a)
        return self.grad_shard[lo : lo + (b - a)]

    def param_view(self, bucket: Bucket, a: int, b: int) -> torch.Tensor | None:
        """This rank's stored weights of ``[a, b)`` (stage 3), else None (the parameter itself)."""
        if self.param_shard is None:
            return None
        lo = self.compact(bucket, a)
        return self.param_shard[lo : lo + (b - a)]

    # -------------------------------------------------------------- gradients

    def attach_grads(self) -> None:
        """Attach the ``.grad`` views (reallocating the released buffer unless the executor will)."""
        if not self.lazy:
            self.ensure_grads()
        super().attach_grads()

    def ensure_grads(self) -> None:
        """Reallocate the released fp32 gradient buffer, zeroed."""
        if _alloc(self.data):
            self.data.zero_()

    def reset(self) -> None:
        """A new step: this buffer will be finished again."""
        super().reset()
        self.finished = False

    def finish(self) -> None:
        """Reduce-scatter as ZeRO-1 does, keep this rank's shard, release the full buffer (once a step)."""
        if self.finished:
            return
        self.finished = True
        self.ensure_grads()  # a chunk without backward this step reduces zeros, like every dp rank
        partial, self.partial_groups = self.partial_groups, []
        super().finish()  # launches, waits; no tp-partial all-reduce on the full buffer
        self.partial_groups = partial
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            self.grad_view(bucket, lo, hi).copy_(self.data[lo:hi])
        for group in self.partial_groups:
            if group is not None and torch.distributed.get_world_size(group) > 1:
                comm.all_reduce(self.grad_shard, group, tag="grad")
        _free(self.data)

    # -------------------------------------------------------------- parameters (stage 3)

    @torch.no_grad()
    def cast_params(self, dtype: torch.dtype) -> None:
        """As ``GradBuffer.cast_params``; stage 3 also copies out this rank's shard of every bucket.

        The full buffer stays resident (materialized) until the executor first releases it, so a
        checkpoint can be loaded into the parameters right after setup.
        """
        super().cast_params(dtype)
        if self.stage < 3:
            return
        n = self.data.numel() // self.dp_size
        self.param_shard = torch.empty(n, dtype=dtype, device=self.data.device)  # [numel/dp]
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            self.param_view(bucket, lo, hi).copy_(self.param_data[lo:hi])

    @property
    def resident(self) -> bool:
        """Whether the full parameter buffer is allocated (gathered or being gathered)."""
        return self.param_data.untyped_storage().nbytes() > 0

    @torch.no_grad()
    def gather(self, async_op: bool) -> None:
        """Allocate the full parameter buffer and all-gather every bucket from the dp shards.

        The collective writes through ``.data`` (an alias with its own version counter): the
        values are the ones autograd saved at forward time, so no saved tensor is invalidated.
        """
        _alloc(self.param_data)
        full = self.param_data.data  # [numel]
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            shard = self.param_view(bucket, lo, hi)
            if self.dp_size == 1:
                full[bucket.start : bucket.end].copy_(shard)
                continue
            out = full[bucket.start : bucket.end]  # [bucket numel]
            self.gathering.append(
                comm.all_gather_single(out, shard, self.dp_group, async_op=async_op, tag="param")
            )
        if not async_op:
            self.wait_gather()

    def wait_gather(self) -> None:
        """Wait for this buffer's in-flight parameter gathers."""
        for work in self.gathering:
            if work is not None:
                work.wait()
        self.gathering = []

    def release(self) -> None:
        """Free the full parameter buffer (stage 3); the shard stays."""
        self.wait_gather()
        if self.param_shard is not None:
            _free(self.param_data)

    def all_gather_params(self, async_op: bool = False) -> None:
        """After the step: stage 3 keeps the weights sharded (gathered per chunk run instead)."""
        if self.stage < 3:
            super().all_gather_params(async_op)

    def materialize(self) -> None:
        """Stage 3: make the full weights resident and current (before saving or reading them)."""
        self.wait_gather()
        if self.stage >= 3:
            self.gather(async_op=False)


class ChunkGathers:
    """Stage 3: when the executor gathers and releases each chunk's weights (see module docstring).

    Args:
        buffers: the model's ``ShardedGradBuffer``s (stage 3).
        actions: this pipeline rank's action list (the executor's).
    """

    def __init__(self, buffers: Sequence[ShardedGradBuffer], actions: Sequence):
        self.by_chunk: dict[int, list[ShardedGradBuffer]] = {}
        for buffer in buffers:
            self.by_chunk.setdefault(buffer.chunk, []).append(buffer)
        self.runs = []  # [first action index, last action index, chunk]
        for i, action in enumerate(actions):
            if action.is_comm:
                continue
            if self.runs and self.runs[-1][2] == action.chunk:
                self.runs[-1][1] = i
            else:
                self.runs.append([i, i, action.chunk])
        # the last run of each chunk with a backward: its gradients are final when it ends
        self.last_backward, self.backward_runs = {}, set()
        for r, (first, last, chunk) in enumerate(self.runs):
            if any(actions[j].kind == "B" for j in range(first, last + 1)):
                self.last_backward[chunk] = r
                self.backward_runs.add(r)
                for buffer in self.by_chunk.get(chunk, []):
                    buffer.lazy = True
        self.start_of = {run[0]: r for r, run in enumerate(self.runs)}
        self.end_of = {run[1]: r for r, run in enumerate(self.runs)}
        self.gathers = 0  # chunk gathers of the last ``run`` (counted for tests and benchmarks)

    def _gather(self, chunk: int, async_op: bool) -> None:
        buffers = self.by_chunk.get(chunk, [])
        buffers = [b for b in buffers if b.param_shard is not None]  # stage 2: weights stay whole
        if buffers and not all(b.resident for b in buffers):
            self.gathers += 1
        for buffer in buffers:
            if not buffer.resident:
                buffer.gather(async_op=async_op)

    def before(self, i: int) -> None:
        """Before compute action ``i``: its chunk's weights are complete; prefetch the next run's."""
        r = self.start_of.get(i)
        if r is None:
            return
        if r == 0:
            self.gathers = 0
        chunk = self.runs[r][2]
        if r in self.backward_runs:  # the fp32 gradients exist from the chunk's first backward on
            for buffer in self.by_chunk.get(chunk, []):
                buffer.ensure_grads()
        self._gather(chunk, async_op=False)
        for buffer in self.by_chunk.get(chunk, []):
            buffer.wait_gather()
        if r + 1 < len(self.runs):
            self._gather(self.runs[r + 1][2], async_op=True)

    def after(self, i: int) -> None:
        """After compute action ``i``: release its chunk's weights if its run ends here."""
        r = self.end_of.get(i)
        if r is None:
            return
        chunk = self.runs[r][2]
        for buffer in self.by_chunk.get(chunk, []):
            buffer.release()
            if self.last_backward.get(chunk) == r:
                buffer.finish()  # reduce-scatter (if the hooks did not), keep the shard, free the rest


def chunk_gathers(grad_sync, actions: Sequence) -> ChunkGathers | None:
    """The executor's ``gathers`` for ``actions``: a ``ChunkGathers`` under ZeRO-2/3, else None."""
    if grad_sync is None or getattr(grad_sync, "stage", 1) < 2:
        return None
    return ChunkGathers(grad_sync.buffers, actions)

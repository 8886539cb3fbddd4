"""Data-parallel gradient buffers: contiguous fp32 (main) gradients, reduced bucket by bucket.

Parameters are grouped by their reduction rule (``grads.grad_reduce_groups``: dense params over
``dp``, expert params over ``edp``, tp-partial ones over ``tp`` first). Each group gets one flat
fp32 buffer and every parameter's ``main_grad`` is its slice. fp32 parameters: ``.grad`` is that
same view, so autograd accumulates the microbatches in place. bf16/fp16 parameters (the mixed
precision recipe, ``training.runtime``): a post-accumulate-grad hook adds each low-precision
``.grad`` into ``main_grad`` and drops it (``main_grad += grad; grad = None``), so microbatches
accumulate in fp32 and no gradient-sized low-precision tensor outlives its backward step.

Parameter buffers (``cast_params``): under mixed precision (and with ``overlap_param_gather``) the
parameters themselves become views of one flat buffer per gradient buffer, in the compute dtype,
with the same layout, so the distributed optimizer's parameter all-gather is one in-place
collective per bucket in the parameter dtype (bf16 on the wire under bf16 training).

Layout: parameters are placed in REVERSE ``named_parameters`` order, the order backward produces
their gradients (the head first, the embedding last), and the buffer is cut into buckets of about
``parallel.grad_bucket_mb``: a bucket is closed once it holds that much, at a pipeline-chunk
boundary (a chunk's backward ends before the next one's starts under breadth-first), and around a
tied embedding (its own bucket, so the first and the last stage shard it identically). Each bucket
is padded to a multiple of ``dp * 128`` elements so it splits into equal, aligned shards.

Reduction: SUM (the loss is divided by the global token count). Without sharding a bucket is
all-reduced over its dp group; with the distributed optimizer it is reduce-scattered and rank r
keeps shard r (``shard_range``), the rest of its copy is stale. Buckets of tp-partial parameters
are reduced over dp, then their (shard of the) sum is all-reduced over tp at ``finish_grad_sync``:
both are sums, so the order does not matter, and those buckets are small (norms, routers).
``parallel.grad_reduce_dtype bf16`` reduces a bf16 copy of each bucket and writes the result back
into the fp32 buffer (half the bytes on the wire; the tp-partial sums stay fp32).

Overlap (``parallel.overlap_grad_reduce``): a post-accumulate-grad hook counts, per parameter,
the backward passes of the step. The number of microbatches is known at ``start_step``, so a
parameter is final when its count reaches it: this happens in the last microbatch's backward of
its own chunk, whatever the pipeline schedule. A bucket launches its async collective once all its
parameters are final AND every earlier bucket of its buffer has launched: all ranks of a dp group
then issue the same collectives in the same order even when a parameter (an expert without
tokens) gets no gradient on some rank. Such a bucket, and everything after it, is launched by
``finish_grad_sync``, which then waits for all of them.

Parameter all-gather overlap (``parallel.overlap_param_gather``): after the sharded step each
bucket's in-place all-gather is launched asynchronously and a forward pre-hook of every module
owning parameters waits for the buckets of its parameters just before it runs, so the gather of
later buckets overlaps the forward of earlier layers. ``finish_grad_sync`` waits for any bucket
no forward touched (before the next step writes into the parameters again).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel import comm
from megatron_lite.parallel.buckets import SHARD_ALIGN, Bucket, layout_buckets, mb_to_elements
from megatron_lite.parallel.grads import grad_reduce_groups

__all__ = ["SHARD_ALIGN", "Bucket", "GradBuffer", "GradSync", "mb_to_elements"]


# Every collective of this file goes through one of these: the comm layer's recorded wrappers.
def _all_reduce(t: torch.Tensor, group, async_op: bool = False):
    return comm.all_reduce(t, group, async_op=async_op, tag="grad")


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    return comm.reduce_scatter_single(out, inp, group, async_op=async_op, tag="grad")


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    return comm.all_gather_single(out, inp, group, async_op=async_op, tag="param")


class GradBuffer:
    """One flat fp32 gradient buffer for the parameters sharing one reduction rule.

    Args:
        groups: ``grad_reduce_groups`` of these params, e.g. ``("dp_cp",)``, ``("edp",)``,
            ``("tp", "dp_cp")``.
        named_params: ``(canonical name, param)`` in buffer order (reverse of the model's order).
        dims: the ``ParallelDims`` (process groups).
        bucket_elems: close a bucket once it holds at least this many elements.
        shard: reduce-scatter (distributed optimizer) instead of all-reduce.
        own_bucket: names that get a bucket of their own (tied embedding copies).
        chunk_of: ``id(param) -> pipeline chunk``; a bucket never spans two chunks.
        reduce_dtype: dtype of the data-parallel reduction (fp32, or bf16: a bf16 copy on the wire).
    """

    def __init__(
        self,
        groups: tuple[str, ...],
        named_params: list[tuple[str, nn.Parameter]],
        dims,
        bucket_elems: int,
        shard: bool,
        own_bucket: Collection[str] = (),
        chunk_of: dict[int, int] | None = None,
        reduce_dtype: torch.dtype = torch.float32,
    ):
        self.groups, self.shard, self.reduce_dtype = tuple(groups), shard, reduce_dtype
        self.dp_name, self.partial = self.groups[-1], self.groups[:-1]
        self.dp_group = dims.group(self.dp_name)
        self.dp_size = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        self.dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        self.partial_groups = [dims.group(g) for g in self.partial]
        device = named_params[0][1].device
        self.buckets = layout_buckets(
            named_params, bucket_elems, self.dp_size * SHARD_ALIGN, own_bucket, chunk_of
        )
        self.data = torch.zeros(self.buckets[-1].end, dtype=torch.float32, device=device)  # [numel]
        self.param_data: torch.Tensor | None = None  # [numel] in the parameter dtype (``cast_params``)
        self.forward_waits = 0  # parameter all-gathers waited for by a forward pre-hook (overlap)
        self.next_launch = 0
        for bucket in self.buckets:
            for param, (start, end) in zip(bucket.params, bucket.ranges):
                param.main_grad = self.data[start:end].view_as(param)

    @property
    def overlappable(self) -> bool:
        """tp-partial buffers are reduced synchronously in ``finish_grad_sync``."""
        return not self.partial

    def attach_grads(self) -> None:
        """Point every fp32 parameter's ``.grad`` at its slice (low-precision ones: ``grad = None``)."""
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = param.main_grad if param.dtype == torch.float32 else None

    @torch.no_grad()
    def cast_params(self, dtype: torch.dtype) -> None:
        """Move the parameters into one flat ``dtype`` buffer laid out like the gradients.

        Each parameter's value is cast (fp32 init -> bf16 weights) and its ``.data`` becomes a view
        of ``param_data``; the Parameter objects (hooks, optimizer references) stay the same.
        """
        self.param_data = torch.zeros(self.data.numel(), dtype=dtype, device=self.data.device)  # [numel]
        for bucket in self.buckets:
            for param, (start, end) in zip(bucket.params, bucket.ranges):
                view = self.param_data[start:end].view_as(param)
                view.copy_(param.data)
                param.data = view

    def grad_view(self, bucket: Bucket, a: int, b: int) -> torch.Tensor:
        """The reduced gradient of buffer elements ``[a, b)`` (inside this rank's shard)."""
        return self.data[a:b]

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """``[start, end)`` (buffer coordinates) of the shard this rank owns after reduce-scatter."""
        size = (bucket.end - bucket.start) // self.dp_size
        start = bucket.start + self.dp_rank * size
        return start, start + size

    def reset(self) -> None:
        """Forget last step's collectives (the gradients are zeroed separately)."""
        self.next_launch = 0
        for bucket in self.buckets:
            bucket.waiting, bucket.work = len(bucket.params), None
            bucket.launched = bucket.in_backward = bucket.early = False

    def launch_ready(self) -> None:
        """From a hook: launch, in bucket order, every bucket whose gradients are all final."""
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].waiting == 0:
            self._launch(self.buckets[self.next_launch], in_backward=True)

    def _launch(self, bucket: Bucket, in_backward: bool) -> None:
        data = self.data[bucket.start : bucket.end]  # [bucket numel]
        if self.dp_size > 1:
            start, end = self.shard_range(bucket) if self.shard else (bucket.start, bucket.end)
            wire = data if self.reduce_dtype == torch.float32 else data.to(self.reduce_dtype)
            if self.shard:
                shard = wire[start - bucket.start : end - bucket.start]  # a view of ``wire``: in place
                bucket.work = _reduce_scatter(shard, wire, self.dp_group, async_op=True)
            else:
                bucket.work = _all_reduce(wire, self.dp_group, async_op=True)
            if wire is not data:  # the reduced low-precision values replace the fp32 ones on wait
                bucket.result = (wire[start - bucket.start : end - bucket.start], self.data[start:end])
        bucket.launched, bucket.in_backward = True, in_backward
        bucket.early = in_backward and any(b.waiting for b in self.buckets[bucket.index + 1 :])
        self.next_launch = bucket.index + 1

    def finish(self) -> None:
        """Launch what the hooks did not, wait for everything, then sum tp-partial grads over tp."""
        for bucket in self.buckets[self.next_launch :]:
            self._launch(bucket, in_backward=False)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
            if bucket.result is not None:
                wire, target = bucket.result
                target.copy_(wire)
                bucket.result = None
        for group in self.partial_groups:
            if group is None or dist.get_world_size(group) == 1:
                continue
            for bucket in self.buckets:
                start, end = self.shard_range(bucket) if self.shard else (bucket.start, bucket.end)
                _all_reduce(self.data[start:end], group)

    @torch.no_grad()
    def all_gather_params(self, async_op: bool = False) -> None:
        """After a sharded step: give every dp rank the parameters the others updated.

        With a parameter buffer (``cast_params``) the optimizer has written this rank's shard into
        it, and each bucket is completed by one in-place all-gather in the parameter dtype;
        ``async_op`` leaves them in flight for ``wait_param_gather``. Without one (fp32 parameters)
        the gradient buffer is the staging area (its gradients are spent until the next
        ``reset``), so no parameter-sized buffer is allocated: each rank writes its updated shard
        into it, an in-place all-gather completes every bucket, and the params copy it back.
        """
        if self.dp_size == 1:
            return  # the shard is the whole bucket: the step already updated every element
        if self.param_data is not None:
            for bucket in self.buckets:
                lo, hi = self.shard_range(bucket)
                out = self.param_data[bucket.start : bucket.end]  # [bucket numel]
                bucket.gather = _all_gather(out, self.param_data[lo:hi], self.dp_group, async_op=True)
                if not async_op:
                    self.wait_param_gather(bucket)
            return
        works = []
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            for param, (start, end) in zip(bucket.params, bucket.ranges):
                a, b = max(lo, start), min(hi, end)
                if a < b:
                    self.data[a:b].copy_(param.view(-1)[a - start : b - start])
            data = self.data[bucket.start : bucket.end]
            works.append(_all_gather(data, self.data[lo:hi], self.dp_group, async_op=True))
        for bucket, work in zip(self.buckets, works):
            work.wait()
            for param, (start, end) in zip(bucket.params, bucket.ranges):
                param.view(-1).copy_(self.data[start:end])

    def wait_param_gather(self, bucket: Bucket | None = None) -> None:
        """Wait for ``bucket``'s in-flight parameter all-gather (every bucket's when None)."""
        for b in [bucket] if bucket is not None else self.buckets:
            if b.gather is not None:
                b.gather.wait()
                b.gather = None


class GradSync:
    """Every gradient buffer of a model, the hooks, and the per-step protocol the trainer follows.

    ``start_step(num_microbatches)`` before the first forward; backward(s); ``finish_grad_sync()``
    before clipping (then the tied-embedding all-reduce). With ``shard`` each rank's reduced
    gradients are only its shards (``GradBuffer.shard_range``), which the distributed optimizer
    steps and ``all_gather_params`` redistributes. Every parameter's fp32 gradient is its
    ``main_grad`` (a view of its buffer), whatever the parameter dtype.

    Args:
        model: the local model (fp32 parameters at construction; ``cast_params`` may then move them
            to the compute dtype; ``model.parallel_state`` when parallelized).
        dims: the ``ParallelDims``.
        bucket_mb: bucket size in MiB of fp32 gradients.
        overlap: launch each bucket's collective from the backward hooks.
        shard: reduce-scatter for the distributed optimizer.
        own_bucket: canonical names that get a bucket of their own (tied embedding under pp).
        chunk_of: ``id(param) -> pipeline chunk`` (buckets do not span chunks).
        reduce_dtype: dtype of the data-parallel gradient reduction (``parallel.grad_reduce_dtype``).
        overlap_param_gather: leave the parameter all-gathers in flight after the step and wait for
            each bucket in a forward pre-hook of the modules owning its parameters.
        stage: ZeRO stage (``parallel.zero``): 2 or 3 build one ``ShardedGradBuffer`` per (rule,
            pipeline chunk) that keeps only its shard of the gradients (and of the weights at 3).
    """

    def __init__(
        self,
        model: nn.Module,
        dims,
        bucket_mb: float,
        overlap: bool = False,
        shard: bool = False,
        own_bucket: Collection[str] = (),
        chunk_of: dict[int, int] | None = None,
        reduce_dtype: torch.dtype = torch.float32,
        overlap_param_gather: bool = False,
        stage: int = 1,
    ):
        self.overlap, self.shard, self.overlap_param_gather = overlap, shard, overlap_param_gather
        self.stage = stage
        by_rule: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        for name, param in reversed(list(model.named_parameters())):
            if not param.requires_grad:
                continue
            if param.dtype != torch.float32 or not param.is_contiguous():
                raise ValueError(f"{name}: gradient buffers are built from contiguous fp32 parameters")
            key = grad_reduce_groups(model, name)
            if stage >= 2:  # one buffer per chunk: its storage is released and gathered as a whole
                key = (key, (chunk_of or {}).get(id(param), 0))
            by_rule.setdefault(key, []).append((name, param))
        # Same names on every rank of a dp group -> same buffers, buckets and collective order.
        elems = mb_to_elements(bucket_mb)
        args = (dims, elems, shard, own_bucket, chunk_of, reduce_dtype)
        if stage >= 2:
            from megatron_lite.parallel.zero import ShardedGradBuffer  # zero builds on this module

            self.buffers = [
                ShardedGradBuffer(groups, named, *args, stage=stage, chunk=chunk)
                for (groups, chunk), named in by_rule.items()
            ]
        else:
            self.buffers = [GradBuffer(groups, named, *args) for groups, named in by_rule.items()]
        self._expected, self._armed = 1, False
        self._counts: dict[int, int] = {}
        self._handles = []
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                for param in bucket.params:
                    # Accumulates low-precision grads into main_grad; counts them for the overlap.
                    hook = _Hook(self, buffer, bucket, count=overlap and buffer.overlappable)
                    self._handles.append(param.register_post_accumulate_grad_hook(hook))
        if overlap_param_gather:
            self._register_gather_waits(model)
        self.start_step(1)
        self._armed = False  # until the trainer starts a step

    def _register_gather_waits(self, model: nn.Module) -> None:
        """A forward pre-hook on every module owning parameters waits for their buckets' gathers."""
        where = {id(p): (buf, b) for buf in self.buffers for b in buf.buckets for p in b.params}
        for module in model.modules():
            owned = [where[id(p)] for p in module.parameters(recurse=False) if id(p) in where]
            if owned:
                self._handles.append(module.register_forward_pre_hook(_GatherWait(owned)))

    def cast_params(self, dtype: torch.dtype) -> None:
        """Make every parameter a view of a flat ``dtype`` buffer (see ``GradBuffer.cast_params``)."""
        for buffer in self.buffers:
            buffer.cast_params(dtype)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Zero every buffer and (re)attach the ``.grad`` views (an optimizer may have set them to None)."""
        for buffer in self.buffers:
            buffer.attach_grads()  # first: a ZeRO-2/3 buffer reallocates its released storage
            if buffer.data.untyped_storage().nbytes():  # (or leaves it to the executor: lazy)
                buffer.data.zero_()

    def start_step(self, num_microbatches: int) -> None:
        """Zero the gradients; each parameter will see ``num_microbatches`` backward passes."""
        self.zero_grad()
        for buffer in self.buffers:
            buffer.reset()
        self._counts.clear()
        self._expected, self._armed = num_microbatches, self.overlap

    def _on_grad(self, buffer: GradBuffer, bucket: Bucket, param: nn.Parameter) -> None:
        if not self._armed:
            return  # a backward outside a training step (tests, tools): just accumulate
        key = id(param)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._counts[key] == self._expected:
            bucket.waiting -= 1
            if bucket.waiting == 0:
                buffer.launch_ready()

    def finish_grad_sync(self) -> None:
        """Complete every reduction (async buffers first, in order, then the tp-partial ones)."""
        self._armed = False
        for buffer in self.buffers:  # buckets no forward waited for, before the step overwrites them
            buffer.wait_param_gather()
        for buffer in sorted(self.buffers, key=lambda b: not b.overlappable):
            buffer.finish()

    def all_gather_params(self) -> None:
        """After a sharded optimizer step: every dp rank gets the whole updated parameters.

        With ``overlap_param_gather`` the gathers stay in flight (the next forward waits for them).
        """
        for buffer in self.buffers:
            buffer.all_gather_params(async_op=self.overlap_param_gather)

    def wait_param_gather(self) -> None:
        """Wait for every in-flight parameter all-gather (before reading or saving parameters).

        Under ZeRO-3 this gathers every chunk's weights (they stay resident until the executor
        releases them after their next run).
        """
        for buffer in self.buffers:
            getattr(buffer, "materialize", buffer.wait_param_gather)()

    def stats(self) -> dict[str, int]:
        """The last step's overlappable (not tp-partial) buckets.

        Returns:
            ``buckets``: how many; ``launched_in_backward``: launched by a hook, before
            ``finish_grad_sync``; ``launched_early``: of those, launched while a later bucket of
            the same buffer still waited for gradients (communication overlapping computation).
        """
        buckets = [b for buffer in self.buffers if buffer.overlappable for b in buffer.buckets]
        return {
            "buckets": len(buckets),
            "launched_in_backward": sum(b.in_backward for b in buckets),
            "launched_early": sum(b.early for b in buckets),
        }

    def remove_hooks(self) -> None:
        """Detach the backward hooks (the buffers stay attached)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Hook:
    """Post-accumulate-grad hook of one parameter (a class, so it holds no closure cell)."""

    def __init__(self, sync: GradSync, buffer: GradBuffer, bucket: Bucket, count: bool):
        self.sync, self.buffer, self.bucket, self.count = sync, buffer, bucket, count

    def __call__(self, param: nn.Parameter) -> None:
        if param.dtype != torch.float32:  # mixed precision: fp32 main grad, no low-precision grad kept
            param.main_grad.add_(param.grad)
            param.grad = None
        if self.count:
            self.sync._on_grad(self.buffer, self.bucket, param)


class _GatherWait:
    """Forward pre-hook: wait for the parameter all-gathers of a module's buckets."""

    def __init__(self, owned: list[tuple[GradBuffer, Bucket]]):
        self.owned = owned

    def __call__(self, _module: nn.Module, _args) -> None:
        for buffer, bucket in self.owned:
            if bucket.gather is not None:
                buffer.wait_param_gather(bucket)
                buffer.forward_waits += 1

"""Comm primitives on 2 real gloo ranks: forward against the global computation, backward by the
adjoint identity sum_r <f(x)_r, y_r> == sum_r <x_r, f^T(y)_r> (what autograd relies on)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from megatron_lite.parallel import comm

pytestmark = pytest.mark.slow


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_adjoint(fn, x_shapes, y_shape_fn, rank, world, replicated_in=False, replicated_out=False):
    """Forward ``fn`` on rank inputs, backward with random cotangents, compare the two inner products.

    A replicated tensor (same on every rank) is one global tensor: its inner product counts once.
    """
    x = _rand(x_shapes[rank], 100 + (0 if replicated_in else rank)).requires_grad_()
    out = fn(x)
    y = _rand(out.shape, 200 + (0 if replicated_out else rank))
    assert tuple(out.shape) == tuple(y_shape_fn(rank))
    out.backward(y)
    once = 1.0 if rank == 0 else 0.0
    sums = torch.stack(
        [
            (out.detach() * y).sum() * (once if replicated_out else 1.0),
            (x.detach() * x.grad).sum() * (once if replicated_in else 1.0),
        ]
    )
    dist.all_reduce(sums)
    torch.testing.assert_close(sums[0], sums[1])
    return x, out


def _body(rank, world):
    group = dist.new_group(list(range(world)))
    xs = [_rand((2, 4, 3), 100 + r) for r in range(world)]  # every rank can rebuild all inputs
    total = sum(xs)

    _, out = _check_adjoint(
        lambda x: comm.reduce_from_region(x, group),
        [(2, 4, 3)] * world,
        lambda r: (2, 4, 3),
        rank,
        world,
        replicated_out=True,
    )
    torch.testing.assert_close(out, total)
    x, out = _check_adjoint(
        lambda x: comm.copy_to_region(x, group),
        [(2, 4, 3)] * world,
        lambda r: (2, 4, 3),
        rank,
        world,
        replicated_in=True,
    )
    torch.testing.assert_close(x.grad, sum(_rand((2, 4, 3), 200 + r) for r in range(world)))
    _check_adjoint(
        lambda x: comm.scatter_to_sequence(x, group, dim=1),
        [(2, 4, 3)] * world,
        lambda r: (2, 2, 3),
        rank,
        world,
        replicated_in=True,
    )
    _check_adjoint(
        lambda x: comm.gather_from_sequence(x, group, dim=1, reduce_grad=False),
        [(2, 2, 3)] * world,
        lambda r: (2, 4, 3),
        rank,
        world,
        replicated_out=True,
    )
    _, out = _check_adjoint(
        lambda x: comm.gather_from_sequence(x, group, dim=1),
        [(2, 4, 3)] * world,
        lambda r: (2, 8, 3),
        rank,
        world,
    )
    torch.testing.assert_close(out, torch.cat(xs, dim=1))
    _, out = _check_adjoint(
        lambda x: comm.reduce_scatter_to_sequence(x, group, dim=1),
        [(2, 4, 3)] * world,
        lambda r: (2, 2, 3),
        rank,
        world,
    )
    torch.testing.assert_close(out, total[:, 2 * rank : 2 * rank + 2])

    # Scatter / non-reducing gather act on replicated tensors: check them directly.
    full = _rand((2, 4, 3), 7).requires_grad_()
    part = comm.scatter_to_sequence(full, group, dim=1)
    torch.testing.assert_close(part, full.detach()[:, 2 * rank : 2 * rank + 2])
    back = comm.gather_from_sequence(part, group, dim=1, reduce_grad=False)
    torch.testing.assert_close(back, full.detach())
    back.backward(torch.ones_like(back))
    torch.testing.assert_close(full.grad, torch.ones_like(full))  # split then all-gather: replicated grad

    # Uneven token exchanges: rank r has 3 + 2r rows.
    sizes = [3 + 2 * r for r in range(world)]
    _, out = _check_adjoint(
        lambda x: comm.all_gather_tokens(x, sizes, group),
        [(n, 5) for n in sizes],
        lambda r: (sum(sizes), 5),
        rank,
        world,
    )
    torch.testing.assert_close(out, torch.cat([_rand((n, 5), 100 + r) for r, n in enumerate(sizes)]))
    _check_adjoint(
        lambda x: comm.reduce_scatter_tokens(x, sizes, group),
        [(sum(sizes), 5)] * world,
        lambda r: (sizes[r], 5),
        rank,
        world,
    )
    # all_to_all: rank r sends send[r][j] rows to rank j (zero-size chunks included).
    send = [[2, 0], [1, 3]]
    recv = [send[j][rank] for j in range(world)]
    _, out = _check_adjoint(
        lambda x: comm.all_to_all(x, recv, send[rank], group),
        [(sum(s), 4) for s in send],
        lambda r: (sum(send[j][r] for j in range(world)), 4),
        rank,
        world,
    )
    expected = torch.cat([_rand((sum(send[j]), 4), 100 + j).split(send[j])[rank] for j in range(world)])
    torch.testing.assert_close(out, expected)
    _check_recorder(rank, world, group)


def _check_recorder(rank, world, group):
    """The recorder notes kind, tag, group size, dtype and bytes of every wrapped call, nested too."""
    x = torch.ones(2, 4, 3, dtype=torch.bfloat16, requires_grad=True)  # 48 bytes
    with comm.CommRecorder() as outer:
        with comm.CommRecorder() as inner:
            y = comm.gather_from_sequence(x, group, dim=1)  # [2, 8, 3] bf16: 96 bytes gathered
        y.float().sum().backward()  # reduce-scatter of the fp32-cast gradient (cast back to bf16)
        comm.all_reduce_(torch.zeros(3), group)
        peer = 1 - rank
        ops = [dist.P2POp(dist.isend, torch.zeros(5, dtype=torch.float16), group=group, group_peer=peer)]
        ops.append(dist.P2POp(dist.irecv, torch.empty(5, dtype=torch.float16), group=group, group_peer=peer))
        for work in comm.batch_isend_irecv(ops, group):
            work.wait()
    comm.all_reduce_(torch.zeros(1), group)  # outside: not recorded
    rec = comm.CommRecord
    assert inner.records == [rec("all_gather", "activation", world, torch.bfloat16, 96)]
    assert outer.records == [
        *inner.records,
        rec("reduce_scatter", "activation", world, torch.bfloat16, 96),
        rec("all_reduce", "stat", world, torch.float32, 12),
        rec("send", "activation", world, torch.float16, 10),
        rec("recv", "activation", world, torch.float16, 10),
    ]
    assert outer.summary()[("all_gather", "activation", "bfloat16")] == 96


def test_comm_primitives_forward_and_adjoint():
    run_distributed(_body, 2)


def test_single_rank_group_is_identity():
    x = torch.randn(2, 4, 3)
    for fn in (
        comm.copy_to_region,
        comm.reduce_from_region,
        comm.scatter_to_sequence,
        comm.gather_from_sequence,
        comm.reduce_scatter_to_sequence,
    ):
        assert fn(x, None) is x
    assert comm.all_to_all(x, [2], [2], None) is x

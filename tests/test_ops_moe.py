"""MoE routing ops: compiled faces vs the torch reference, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_lite import ops
from megatron_lite.ops import _backend
from megatron_lite.ops.grouped_mm import grouped_mm_unusable_reason

_WHY_NO_KERNEL = _backend.unavailable_reason("moe_permute", torch.device("cpu"))
cpu_kernel = pytest.mark.skipif(_WHY_NO_KERNEL is not None, reason=str(_WHY_NO_KERNEL))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("auto_op_backend")  # tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(face: str, fn, *args, grad_of=(), grad_seed: int = 0):
    """Runs ``fn`` under ``face``; returns (outputs, grads of ``grad_of`` indices of args)."""
    args = [
        a.detach().clone().requires_grad_(i in grad_of) if torch.is_tensor(a) else a
        for i, a in enumerate(args)
    ]
    with ops.use_backend(face):
        out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    grads = []
    if grad_of:
        g = torch.randn(first.shape, generator=gen(grad_seed)).to(first.device, first.dtype)
        grads = list(torch.autograd.grad(first, [args[i] for i in grad_of], g))
    return out, grads


def router_logits(T: int, E: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, E, generator=gen(seed)).to(dtype)


def expected_topk(logits: torch.Tensor, k: int) -> list[list[int]]:
    """Slow oracle for the documented order: larger fp32 logit first, ties -> lower index."""
    rows = logits.float().tolist()
    return [sorted(range(len(r)), key=lambda e, r=r: (-r[e], e))[:k] for r in rows]


# ---------------------------------------------------------------- moe_topk_softmax

TOPK_CASES = [(16, 8, 2), (16, 8, 1), (9, 8, 8), (33, 4, 3), (5, 1, 1), (0, 8, 2)]


@cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("T,E,k", TOPK_CASES)
def test_topk_compiled_matches_reference(T, E, k, dtype):
    logits = router_logits(T, E, dtype, seed=T + E + k)
    (w_c, i_c, n_c), (g_c,) = run("compiled", ops.moe_topk_softmax, logits, k, grad_of=(0,))
    (w_r, i_r, n_r), (g_r,) = run("reference", ops.moe_topk_softmax, logits, k, grad_of=(0,))
    assert w_c.dtype == torch.float32 and i_c.dtype == torch.int64 and n_c.dtype == torch.int64
    assert i_c.tolist() == i_r.tolist() == expected_topk(logits, k)
    assert n_c.tolist() == n_r.tolist() == torch.bincount(i_r.flatten(), minlength=E).tolist()
    torch.testing.assert_close(w_c, w_r)
    torch.testing.assert_close(w_c.sum(-1), torch.ones(T))
    assert g_c.dtype == dtype
    torch.testing.assert_close(g_c, g_r, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


@pytest.mark.parametrize("face", ["reference", pytest.param("compiled", marks=cpu_kernel)])
def test_topk_ties_pick_lowest_index_first(face):
    logits = torch.randint(0, 3, (64, 8), generator=gen(1)).float()  # many exact ties
    logits[0] = 1.0  # all equal: experts 0, 1 in that order
    with ops.use_backend(face):
        w, idx, counts = ops.moe_topk_softmax(logits, 2)
    assert idx[0].tolist() == [0, 1]
    assert idx.tolist() == expected_topk(logits, 2)
    torch.testing.assert_close(w[0], torch.tensor([0.5, 0.5]))


@cpu_kernel
def test_topk_expert_without_tokens_and_non_contiguous():
    logits = torch.randn(8, 40, generator=gen(2)).t()  # [40, 8], non-contiguous
    logits[:, 5] = -1e4  # expert 5 never chosen
    (w_c, i_c, n_c), (g_c,) = run("compiled", ops.moe_topk_softmax, logits, 2, grad_of=(0,))
    (w_r, i_r, n_r), (g_r,) = run("reference", ops.moe_topk_softmax, logits, 2, grad_of=(0,))
    assert n_c[5] == 0 and torch.equal(n_c, n_r) and torch.equal(i_c, i_r)
    torch.testing.assert_close(w_c, w_r)
    torch.testing.assert_close(g_c, g_r)


def test_topk_bad_inputs():
    msg = r"moe_topk_softmax: logits must be a float tensor \[T, E\], got torch.int64 \[4, 8\]"
    with pytest.raises(TypeError, match=msg):
        ops.moe_topk_softmax(torch.zeros(4, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"logits must be a float tensor \[T, E\], got torch.float32 \[8\]"):
        ops.moe_topk_softmax(torch.zeros(8), 2)
    with pytest.raises(ValueError, match="k must be >= 1 and <= 8, got 9"):
        ops.moe_topk_softmax(torch.zeros(4, 8), 9)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ops.moe_topk_softmax(torch.zeros(4, 8), 0)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.moe_topk_softmax(torch.zeros(4, 8), 2.0)


# ---------------------------------------------------------------- moe_permute / moe_unpermute


def routed(T: int, E: int, k: int, H: int, dtype: torch.dtype, seed: int = 0):
    """x [T, H], indices [T, k] (distinct experts per token, expert E-1 unused when E > k), weights."""
    x = torch.randn(T, H, generator=gen(seed)).to(dtype)
    logits = torch.randn(T, E, generator=gen(seed + 1))
    if E > k:
        logits[:, E - 1] = -1e4
    weights, indices, _ = ops.moe_topk_softmax(logits, k)
    return x, indices, weights


PERMUTE_CASES = [(24, 8, 2, 64), (10, 4, 1, 16), (7, 4, 4, 12), (0, 8, 2, 32), (5, 3, 2, 0)]


def check_permutation(x, indices, permuted, row_map) -> None:
    """Independent check of the contract: grouped by expert, token order within, rows copied."""
    k = indices.shape[1]
    experts = indices.flatten()[row_map]
    assert torch.all(experts[1:] >= experts[:-1])
    same = experts[1:] == experts[:-1]
    assert torch.all(row_map[1:][same] > row_map[:-1][same])
    assert torch.equal(permuted, x[row_map // k])


@cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,H", PERMUTE_CASES)
def test_permute_compiled_matches_reference(T, E, k, H, dtype):
    x, indices, _ = routed(T, E, k, H, dtype, seed=T + H)
    (p_c, rm_c), (gx_c,) = run("compiled", ops.moe_permute, x, indices, grad_of=(0,))
    (p_r, rm_r), (gx_r,) = run("reference", ops.moe_permute, x, indices, grad_of=(0,))
    assert rm_c.dtype == torch.int64 and torch.equal(rm_c, rm_r)
    assert p_c.dtype == dtype and torch.equal(p_c, p_r)
    check_permutation(x, indices, p_c, rm_c)
    torch.testing.assert_close(gx_c, gx_r)


@cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,H", PERMUTE_CASES)
def test_unpermute_compiled_matches_reference(T, E, k, H, dtype):
    x, indices, weights = routed(T, E, k, H, dtype, seed=T + H + 1)
    permuted, row_map = ops.moe_permute(x, indices)
    permuted = permuted * 1.5  # stand-in for the experts
    out_c, (gp_c, gw_c) = run("compiled", ops.moe_unpermute, permuted, row_map, weights, grad_of=(0, 2))
    out_r, (gp_r, gw_r) = run("reference", ops.moe_unpermute, permuted, row_map, weights, grad_of=(0, 2))
    assert out_c.dtype == dtype and out_c.shape == (T, H)
    torch.testing.assert_close(out_c, out_r)
    torch.testing.assert_close(gp_c, gp_r)
    assert gw_c.dtype == torch.float32
    torch.testing.assert_close(gw_c, gw_r, atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=1e-3)


@pytest.mark.parametrize("face", ["reference", pytest.param("compiled", marks=cpu_kernel)])
def test_permute_unpermute_round_trip_and_duplicate_experts(face):
    x = torch.randn(6, 8, generator=gen(3))
    indices = torch.tensor([[1, 1], [0, 2], [2, 2], [0, 0], [1, 0], [2, 1]])  # repeats allowed
    weights = torch.rand(6, 2, generator=gen(4))
    weights = weights / weights.sum(-1, keepdim=True)
    with ops.use_backend(face):
        permuted, row_map = ops.moe_permute(x, indices)
        check_permutation(x, indices, permuted, row_map)
        torch.testing.assert_close(ops.moe_unpermute(permuted, row_map, weights), x)


@cpu_kernel
def test_non_contiguous_inputs_and_bf16_weights():
    x = torch.randn(32, 20, generator=gen(5)).t()  # [20, 32]
    indices = torch.randint(0, 4, (2, 20), generator=gen(6)).t()  # [20, 2]
    weights = torch.rand(2, 20, generator=gen(7)).t().to(torch.bfloat16)  # [20, 2]
    (p_c, rm_c), (gx_c,) = run("compiled", ops.moe_permute, x, indices, grad_of=(0,))
    (p_r, rm_r), (gx_r,) = run("reference", ops.moe_permute, x, indices, grad_of=(0,))
    assert torch.equal(p_c, p_r) and torch.equal(rm_c, rm_r)
    torch.testing.assert_close(gx_c, gx_r)
    perm_nc = torch.cat([p_r, p_r], dim=1)[:, ::2]  # non-contiguous [40, 32]
    out_c, (gp_c, gw_c) = run("compiled", ops.moe_unpermute, perm_nc, rm_c, weights, grad_of=(0, 2))
    out_r, (gp_r, gw_r) = run("reference", ops.moe_unpermute, perm_nc, rm_c, weights, grad_of=(0, 2))
    torch.testing.assert_close(out_c, out_r)
    torch.testing.assert_close(gp_c, gp_r)
    assert gw_c.dtype == torch.bfloat16
    torch.testing.assert_close(gw_c, gw_r)


def test_permute_unpermute_bad_inputs():
    x = torch.zeros(4, 8)
    msg = r"moe_permute: indices must be int64 \[T, k\], got torch.int32 \[4, 2\]"
    with pytest.raises(TypeError, match=msg):
        ops.moe_permute(x, torch.zeros(4, 2, dtype=torch.int32))
    msg = r"indices must be int64 \[T, k\] with T = 4 and k >= 1, got torch.int64 \[3, 2\]"
    with pytest.raises(ValueError, match=msg):
        ops.moe_permute(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must be >= 0, got -1"):
        ops.moe_permute(x, torch.full((4, 2), -1))
    with pytest.raises(TypeError, match=r"moe_permute: x must be a float tensor \[T, H\], got torch.int64"):
        ops.moe_permute(torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"moe_unpermute: need weights \[T, k\].*row_map torch.int64 \[7\]"):
        ops.moe_unpermute(torch.zeros(8, 3), torch.arange(7), torch.ones(4, 2))
    with pytest.raises(TypeError, match=r"row_map must be int64 \[T\*k\], got torch.float32"):
        ops.moe_unpermute(torch.zeros(8, 3), torch.zeros(8), torch.ones(4, 2))


@cpu_kernel
def test_compiled_unpermute_rejects_non_permutation():
    with ops.use_backend("compiled"), pytest.raises(RuntimeError, match="row_map is not a permutation"):
        ops.moe_unpermute(torch.zeros(4, 3), torch.tensor([0, 0, 1, 2]), torch.ones(2, 2))


def test_fallback_warns_once_per_op(monkeypatch):
    x, indices, weights = routed(6, 4, 2, 8, torch.float32)
    monkeypatch.setattr(_backend, "_compiled", (None, "simulated: extension missing"))
    with pytest.warns(RuntimeWarning, match="moe_permute: falling back to the .*simulated"):
        permuted, row_map = ops.moe_permute(x, indices)
    with pytest.warns(RuntimeWarning, match="moe_unpermute: falling back"):
        ops.moe_unpermute(permuted, row_map, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.moe_permute(x, indices)
        ops.moe_unpermute(permuted, row_map, weights)
    with ops.use_backend("compiled"), pytest.raises(RuntimeError, match="moe_topk_softmax: backend"):
        ops.moe_topk_softmax(torch.zeros(2, 4), 1)


# ---------------------------------------------------------------- grouped_mm


def grouped_inputs(counts: list[int], d_in: int, d_out: int, dtype: torch.dtype, seed: int = 0):
    x = torch.randn(sum(counts), d_in, generator=gen(seed)).to(dtype)
    w = (torch.randn(len(counts), d_out, d_in, generator=gen(seed + 1)) / d_in**0.5).to(dtype)
    return x, w, torch.tensor(counts)


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 4], [0, 0], [6]])
def test_grouped_mm_loop_matches_per_expert_linear(counts):
    x, w, tpe = grouped_inputs(counts, 16, 8, torch.float32)
    (y,), _ = run("auto", lambda *a: (ops.grouped_mm(*a),), x, w, tpe)
    chunks = torch.split(x, counts)
    want = torch.cat([c @ w[e].t() for e, c in enumerate(chunks)]) if x.shape[0] else torch.zeros(0, 8)
    torch.testing.assert_close(y, want)
    y_nc = ops.grouped_mm(torch.cat([x, x], 1)[:, ::2], w.transpose(1, 2).contiguous().transpose(1, 2), tpe)
    torch.testing.assert_close(y_nc, ops.grouped_mm(torch.cat([x, x], 1)[:, ::2].contiguous(), w, tpe))


@pytest.mark.skipif(
    grouped_mm_unusable_reason(
        torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, 8, 16, dtype=torch.bfloat16)
    )
    is not None,
    reason="torch's grouped GEMM does not run on CPU in bf16 in this torch",
)
def test_grouped_mm_fast_face_matches_loop_bf16():
    x, w, tpe = grouped_inputs([3, 0, 5, 8], 16, 24, torch.bfloat16, seed=3)
    y_f, (gx_f, gw_f) = run("compiled", ops.grouped_mm, x, w, tpe, grad_of=(0, 1))
    y_r, (gx_r, gw_r) = run("reference", ops.grouped_mm, x, w, tpe, grad_of=(0, 1))
    torch.testing.assert_close(y_f, y_r)
    torch.testing.assert_close(gx_f, gx_r)
    torch.testing.assert_close(gw_f, gw_r)
    assert torch.all(gw_f[1] == 0)  # the expert without tokens gets a zero gradient


def test_grouped_mm_bad_inputs():
    x, w, tpe = grouped_inputs([2, 2], 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"tokens_per_expert must be >= 0 and sum to x.shape\[0\] = 4"):
        ops.grouped_mm(x, w, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"tokens_per_expert must be an int tensor \[E\] with E = 2"):
        ops.grouped_mm(x, w, torch.tensor([4]))
    with pytest.raises(TypeError, match="tokens_per_expert must be an int tensor"):
        ops.grouped_mm(x, w, torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match=r"w must be \[E, out, in\]"):
        ops.grouped_mm(x, w.to(torch.bfloat16), tpe)
    x_odd, w_odd, tpe_odd = grouped_inputs([2, 2], 6, 8, torch.float32)  # 24-byte rows
    with ops.use_backend("compiled"), pytest.raises(RuntimeError, match="needs 16-byte aligned rows"):
        ops.grouped_mm(x_odd, w_odd, tpe_odd)


# ---------------------------------------------------------------- CUDA faces


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,H", [(1000, 8, 2, 4096), (37, 8, 8, 100), (64, 64, 6, 256), (0, 8, 2, 64)])
def test_cuda_faces_match_reference(T, E, k, H, dtype):
    logits = router_logits(T, E, dtype, seed=T).cuda()
    logits[:, 3] = -1e4  # expert 3 unused
    (w_c, i_c, n_c), (g_c,) = run("compiled", ops.moe_topk_softmax, logits, k, grad_of=(0,))
    (w_r, i_r, n_r), (g_r,) = run("reference", ops.moe_topk_softmax, logits, k, grad_of=(0,))
    assert torch.equal(i_c, i_r) and torch.equal(n_c, n_r)
    torch.testing.assert_close(w_c, w_r, atol=1e-5, rtol=1e-4)
    g_tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g_c.float(), g_r.float(), atol=g_tol, rtol=1e-2)
    x = torch.randn(T, H, generator=gen(T)).to(dtype).cuda()
    (p_c, rm_c), (gx_c,) = run("compiled", ops.moe_permute, x, i_c, grad_of=(0,))
    (p_r, rm_r), (gx_r,) = run("reference", ops.moe_permute, x, i_c, grad_of=(0,))
    assert torch.equal(rm_c, rm_r) and torch.equal(p_c, p_r)
    torch.testing.assert_close(gx_c, gx_r)
    out_c, (gp_c, gw_c) = run("compiled", ops.moe_unpermute, p_c, rm_c, w_c, grad_of=(0, 2))
    out_r, (gp_r, gw_r) = run("reference", ops.moe_unpermute, p_c, rm_c, w_c, grad_of=(0, 2))
    torch.testing.assert_close(out_c, out_r)
    torch.testing.assert_close(gp_c, gp_r)
    torch.testing.assert_close(gw_c, gw_r, atol=1e-3 if dtype == torch.float32 else 0.5, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_grouped_mm_matches_loop():
    x, w, tpe = grouped_inputs([300, 0, 17, 700], 256, 512, torch.bfloat16, seed=5)
    x, w = x.cuda(), w.cuda()
    y_a, (gx_a, gw_a) = run("auto", ops.grouped_mm, x, w, tpe.cuda(), grad_of=(0, 1))
    y_r, (gx_r, gw_r) = run("reference", ops.grouped_mm, x, w, tpe, grad_of=(0, 1))
    torch.testing.assert_close(y_a, y_r, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx_a, gx_r, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw_a, gw_r, atol=5e-2, rtol=2e-2)

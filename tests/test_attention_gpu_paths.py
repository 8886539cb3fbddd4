"""Paths only a GPU walks, shown on CPU: flash-attn choice, FlexAttention block masks, recompute, RNG."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from megatron_lite.models.common import attention_backends as ab
from megatron_lite.training import checkpoint as ckpt
from megatron_lite.training.model_setup import _selectively_checkpointed, selective_policy

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # a device object only: selection never touches the GPU


def random_cu_seqlens(b: int, s: int, docs: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, b * s, (docs,), generator=g).unique()
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([b * s])]).to(torch.int32)


def expand(block_mask, b: int, s: int, block: int) -> torch.Tensor:
    """The dense ``[b, s, s]`` mask a BlockMask stands for (full blocks true, partial via mask_mod)."""
    n = (s + block - 1) // block
    pad = n * block
    dense = torch.zeros(b, pad, pad, dtype=torch.bool)
    qi, ki = torch.arange(pad)[:, None], torch.arange(pad)[None, :]
    for bi in range(b):
        q_pos, k_pos = qi.clamp(max=s - 1), ki.clamp(max=s - 1)
        inside = block_mask.mask_mod(torch.tensor(bi), torch.tensor(0), q_pos, k_pos)
        for qb in range(n):
            rows = slice(qb * block, (qb + 1) * block)
            for j in range(int(block_mask.full_kv_num_blocks[bi, 0, qb])):
                kb = int(block_mask.full_kv_indices[bi, 0, qb, j])
                dense[bi, rows, kb * block : (kb + 1) * block] = True
            for j in range(int(block_mask.kv_num_blocks[bi, 0, qb])):
                kb = int(block_mask.kv_indices[bi, 0, qb, j])
                cols = slice(kb * block, (kb + 1) * block)
                dense[bi, rows, cols] = inside[rows, cols]
    return dense[:, :s, :s]


@pytest.mark.parametrize(
    "b,s,window,docs", [(2, 72, None, 5), (2, 72, 20, 5), (1, 96, 7, 0), (3, 64, 33, 12)]
)
def test_flex_block_mask_classifies_every_block_right(b, s, window, docs):
    cu = random_cu_seqlens(b, s, docs, seed=s + docs) if docs else None
    got = expand(ab.flex_block_mask(cu, b, s, window, "cpu", block=16), b, s, 16)
    want = ab._dense_mask(b, s, cu, window, "cpu")[:, 0]  # [b, s, s]
    assert torch.equal(got, want)


@pytest.mark.slow
def test_flex_block_mask_at_32k_tokens_stays_under_64_mib():
    """create_block_mask evaluates all s*s pairs: 1 GiB of booleans at s = 32768."""
    code = textwrap.dedent(
        """
        import resource, torch
        from megatron_lite.models.common.attention_backends import flex_block_mask
        cu = torch.tensor([0, 5, 200, 300], dtype=torch.int32)
        flex_block_mask(cu, 1, 300, 64, "cpu")  # warm up lazy imports
        s = 32768
        cuts = torch.sort(torch.randint(1, s, (40,), generator=torch.Generator().manual_seed(0))).values
        cu = torch.cat([torch.tensor([0]), cuts.unique(), torch.tensor([s])]).int()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mask = flex_block_mask(cu, 1, s, 4096, "cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert mask.kv_num_blocks.shape == (1, 1, 256)
        print((after - before) / 1024)
        """
    )
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    extra_mib = float(proc.stdout.split()[-1])
    assert extra_mib < 64, f"building the mask raised peak RSS by {extra_mib:.1f} MiB"


def test_masks_are_shared_by_the_chunks_of_one_microbatch(monkeypatch):
    calls = []
    build = ab._build_mask
    monkeypatch.setattr(ab, "_build_mask", lambda *a: calls.append(a[0]) or build(*a))
    cu = torch.tensor([0, 5, 12, 24], dtype=torch.int32)
    for _chunk in range(3):  # each model chunk's forward makes its own AttentionMeta
        meta = ab.AttentionMeta(cu, 7, window=4)
        for _layer in range(2):
            meta.prepare(2, 12, torch.device("cpu"), torch.float32)
    assert calls == ["sdpa_masked"]
    ab.AttentionMeta(cu.clone(), 7, window=4).prepare(2, 12, torch.device("cpu"), torch.float32)
    assert len(calls) == 2  # the next microbatch builds its own
    del meta, cu
    assert len(ab._PACKED_MASKS) <= 1  # the finished microbatch's masks went with its tensor


@pytest.fixture
def fake_flash(tmp_path, monkeypatch):
    """Installs a fake ``flash_attn`` package whose import works or fails as asked."""

    def install(broken: bool) -> None:
        pkg = tmp_path / ("broken" if broken else "ok") / "flash_attn"
        pkg.mkdir(parents=True)
        body = (
            "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')"
            if broken
            else "def flash_attn_varlen_func(*a, **k):\n    raise AssertionError('not on CPU')\n"
        )
        (pkg / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(pkg.parent))
        for name in [m for m in sys.modules if m.startswith("flash_attn")]:
            monkeypatch.delitem(sys.modules, name)
        ab.flash_attn_unavailable_reason.cache_clear()
        ab._warn_broken_flash.cache_clear()

    yield install
    ab.flash_attn_unavailable_reason.cache_clear()
    ab._warn_broken_flash.cache_clear()


def test_broken_flash_wheel_falls_back_to_flex_with_one_warning(fake_flash):
    fake_flash(broken=True)
    broken = "flash-attn is installed but does not import"
    with pytest.warns(RuntimeWarning, match=f"{broken}.*FlexAttention") as rec:
        assert ab.select_backend("auto", CUDA, packed=True, window=None, dtype=torch.bfloat16) == "flex"
        assert ab.select_backend("auto", CUDA, packed=True, window=None, dtype=torch.bfloat16) == "flex"
    assert len([w for w in rec if "flash-attn" in str(w.message)]) == 1
    with pytest.raises(RuntimeError, match=f"'flash' requested but {broken}"):
        ab.select_backend("flash", CUDA, packed=True, window=None, dtype=torch.bfloat16)


def test_flash_is_never_chosen_for_fp32(fake_flash):
    fake_flash(broken=False)
    assert ab.select_backend("auto", CUDA, packed=True, window=None, dtype=torch.bfloat16) == "flash"
    assert ab.select_backend("auto", CUDA, packed=True, window=None, dtype=torch.float32) == "flex"
    with pytest.raises(RuntimeError, match="needs bf16/fp16 inputs, got torch.float32"):
        ab.select_backend("flash", CUDA, packed=True, window=None, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors; use 'auto' on CPU"):
        ab.select_backend("flash", torch.device("cpu"), packed=True, window=None, dtype=torch.bfloat16)


def test_selective_recompute_saves_flash_and_flex_attention_outputs():
    assert selective_policy(None, torch.ops.higher_order.flex_attention) == CheckpointPolicy.MUST_SAVE
    if hasattr(torch.ops, "flash_attn") and hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):
        pytest.skip("the real flash-attn is loaded; its op cannot be stood in for")
    calls = []

    @torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
    def fake_flash(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    fake_flash.register_autograd(lambda ctx, grad: grad * 2)
    x = torch.randn(4, requires_grad=True)
    out = _selectively_checkpointed(lambda t: fake_flash(t.sin()).cos(), x)
    out.sum().backward()
    assert len(calls) == 1, "the attention output was recomputed in backward instead of being saved"
    torch.testing.assert_close(x.grad, -torch.sin(2 * x.detach().sin()) * 2 * x.detach().cos())


def test_cuda_rng_state_is_this_devices_own_and_old_lists_still_load():
    own = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert ckpt.cuda_rng_state_for_device(own, 5) is own  # one state, whatever the index
    old = [torch.tensor([i], dtype=torch.uint8) for i in range(2)]  # every GPU's, by index
    assert ckpt.cuda_rng_state_for_device(old, 1) is old[1]
    assert ckpt.cuda_rng_state_for_device(old, 3) is None  # relaunch on a later index: fresh seed


def test_rng_state_saves_only_the_current_cuda_generator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    restored = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: restored.append(t))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored by index"))
    ckpt.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"])

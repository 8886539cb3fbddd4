"""packed_seq_metadata: compiled faces vs the torch reference vs a slow Python oracle."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_lite import ops
from megatron_lite.ops import _backend, reference

EOD = 0

_WHY_NO_KERNEL = _backend.unavailable_reason("packed_seq_metadata", torch.device("cpu"))
cpu_kernel = pytest.mark.skipif(_WHY_NO_KERNEL is not None, reason=str(_WHY_NO_KERNEL))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("auto_op_backend")  # tests/conftest.py


def oracle(tokens: list[list[int]], eod: int) -> tuple[list[int], int, list[list[int]], list[list[float]]]:
    """The contract written as plain loops: independent of both faces."""
    cu, pos, mask, flat = [0], [], [], 0
    for row in tokens:
        p, start = [], 0
        for i, tok in enumerate(row):
            p.append(i - start)
            if tok == eod:
                start = i + 1
                if i + 1 < len(row):
                    cu.append(flat + i + 1)
        if row:
            cu.append(flat + len(row))
        flat += len(row)
        pos.append(p)
        mask.append([0.0 if tok == eod else 1.0 for tok in row])
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return cu, max(lengths, default=0), pos, mask


def run(face: str, tokens: torch.Tensor, eod: int = EOD):
    with ops.use_backend(face):
        return ops.packed_seq_metadata(tokens, eod)


def assert_matches_oracle(out, tokens: torch.Tensor, eod: int = EOD) -> None:
    cu, max_seqlen, pos, mask = out
    want_cu, want_max, want_pos, want_mask = oracle(tokens.tolist(), eod)
    assert cu.dtype == torch.int32 and pos.dtype == torch.int64 and mask.dtype == torch.float32
    assert isinstance(max_seqlen, int)
    assert cu.tolist() == want_cu
    assert max_seqlen == want_max
    assert pos.shape == tokens.shape and pos.tolist() == want_pos
    assert mask.shape == tokens.shape and mask.tolist() == want_mask


FACES = ["reference", pytest.param("compiled", marks=cpu_kernel)]

EDGE_CASES = {
    "hand": [[5, 0, 7, 8], [0, 9, 9, 0]],
    "no_eod_row": [[3, 4, 5, 6], [1, 0, 2, 3]],
    "eod_last": [[1, 2, 3, 0], [4, 5, 6, 0]],
    "consecutive_eods": [[1, 0, 0, 0, 2, 0, 0, 3]],
    "eod_first": [[0, 1, 2, 3], [0, 0, 5, 6]],
    "all_eod": [[0, 0, 0], [0, 0, 0]],
    "single_column": [[0], [7], [0]],
}


@pytest.mark.parametrize("face", FACES)
def test_hand_computed_example(face):
    tokens = torch.tensor(EDGE_CASES["hand"])
    cu, max_seqlen, pos, mask = run(face, tokens)
    assert cu.tolist() == [0, 2, 4, 5, 8]
    assert max_seqlen == 3
    assert pos.tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert mask.tolist() == [[1, 0, 1, 1], [0, 1, 1, 0]]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_match_oracle(face, case):
    assert_matches_oracle(run(face, torch.tensor(EDGE_CASES[case])), torch.tensor(EDGE_CASES[case]))


@cpu_kernel
@pytest.mark.parametrize("b,s,vocab", [(1, 1, 2), (3, 17, 3), (8, 300, 5), (2, 2049, 50), (64, 64, 2)])
def test_random_compiled_matches_reference_and_oracle(b, s, vocab):
    gen = torch.Generator().manual_seed(b * 1000 + s)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    compiled, ref = run("compiled", tokens), run("reference", tokens)
    assert_matches_oracle(compiled, tokens)
    for got, want in zip(compiled, ref):
        assert got == want if isinstance(got, int) else torch.equal(got, want)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)])
def test_empty_batch(face, shape):
    tokens = torch.zeros(shape, dtype=torch.int64)
    cu, max_seqlen, pos, mask = run(face, tokens)
    assert cu.tolist() == [0] and max_seqlen == 0
    assert pos.shape == shape and mask.shape == shape


@pytest.mark.parametrize("face", FACES)
def test_non_contiguous_input(face):
    base = torch.randint(0, 3, (10, 6), generator=torch.Generator().manual_seed(1))
    tokens = base.t()  # [6, 10], non-contiguous
    assert not tokens.is_contiguous()
    assert_matches_oracle(run(face, tokens), tokens)


@pytest.mark.parametrize("face", FACES)
def test_nonzero_eod_id_and_negative_tokens(face):
    tokens = torch.tensor([[-1, 2, 50256, 4], [50256, 50256, 9, 9]])
    assert_matches_oracle(run(face, tokens, eod=50256), tokens, eod=50256)


def test_bad_inputs_raise_clear_errors():
    msg = r"packed_seq_metadata: tokens must be int64 \[b, s\], got torch.int32 \[2, 3\]"
    with pytest.raises(TypeError, match=msg):
        ops.packed_seq_metadata(torch.zeros(2, 3, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"tokens must be int64 \[b, s\], got torch.int64 \[6\]"):
        ops.packed_seq_metadata(torch.zeros(6, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        ops.packed_seq_metadata([[1, 2]], 0)
    with pytest.raises(TypeError, match="eod_id must be an int, got float"):
        ops.packed_seq_metadata(torch.zeros(2, 3, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match="set_backend: name must be one of"):
        ops.set_backend("fast")


def test_fallback_warns_once_when_compiled_unavailable(monkeypatch):
    monkeypatch.setattr(_backend, "_compiled", (None, "simulated: extension missing"))
    tokens = torch.tensor(EDGE_CASES["hand"])
    with pytest.warns(RuntimeWarning, match="packed_seq_metadata: falling back .* simulated"):
        out = ops.packed_seq_metadata(tokens, EOD)
    assert_matches_oracle(out, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        ops.packed_seq_metadata(tokens, EOD)
    with ops.use_backend("compiled"), pytest.raises(RuntimeError, match="backend 'compiled' was requested"):
        ops.packed_seq_metadata(tokens, EOD)


def test_reference_is_vectorised_and_one_pass_friendly():
    # Long rows exercise the cummax path; compared against the oracle, not the kernel.
    tokens = torch.randint(0, 4, (2, 5000), generator=torch.Generator().manual_seed(3))
    assert_matches_oracle(reference.packed_seq_metadata(tokens, EOD), tokens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("b,s", [(1, 1), (4, 1023), (3, 1024), (5, 1025), (2, 9000), (0, 4)])
@pytest.mark.parametrize("vocab", [2, 100])
def test_cuda_matches_reference(b, s, vocab):
    tokens = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(s)).cuda()
    compiled, ref = run("compiled", tokens), run("reference", tokens)
    for got, want in zip(compiled, ref):
        assert got == want if isinstance(got, int) else torch.equal(got, want)
    assert_matches_oracle(compiled, tokens.cpu())

"""HF <-> megatron_lite numerics: load_hf logits match transformers; save_hf round-trips."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from megatron_lite.models.hf_io import INDEX_FILE, load_hf, save_hf

SEQ = 24
BASE = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    attn_implementation="eager",
)

CASES = {
    # GQA, window shorter than the sequence, untied head, non-default rope theta.
    "mistral_gqa_window": ("mistral", dict(num_key_value_heads=2, sliding_window=8, rope_theta=5000.0)),
    # MQA, tied embeddings, no window, head_dim != hidden / heads.
    "mistral_mqa_tied": (
        "mistral",
        dict(
            num_key_value_heads=1,
            sliding_window=None,
            tie_word_embeddings=True,
            head_dim=16,
            rope_theta=1234.5,
            rms_norm_eps=1e-5,
        ),
    ),
    "mixtral_4e_top2_window": (
        "mixtral",
        dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    ),
    "mixtral_tied_nowindow": (
        "mixtral",
        dict(
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=True,
            rope_theta=20000.0,
        ),
    ),
}


def make_hf(arch: str, seed: int = 0, **kw):
    """A tiny random HF model in eval mode (weights scaled up so the logits are not all ~0)."""
    torch.manual_seed(seed)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**BASE, **kw}))
    else:
        model = MixtralForCausalLM(MixtralConfig(**{**BASE, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights catch a swapped norm mapping
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    hf = make_hf(arch, **kw)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    return request.param, hf, path, tokens, ref


def test_load_hf_logits_match(case):
    name, hf, path, tokens, ref = case
    model = load_hf(path).eval()
    assert model.cfg.arch == hf.config.model_type
    assert model.cfg.sliding_window == hf.config.sliding_window
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert model.cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    with torch.no_grad():
        out = model(tokens)
    assert (out - ref).abs().max().item() < 1e-4, name
    assert ref.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors


def test_hf_applies_the_window(case):
    """Guard: in the mode used here transformers really masks by the window (else the test above is weak)."""
    name, hf, _, tokens, ref = case
    if hf.config.sliding_window is None:
        pytest.skip("no window in this case")
    hf.config.sliding_window = None
    try:
        with torch.no_grad():
            full = hf(tokens).logits
    finally:
        hf.config.sliding_window = 8
    assert (full - ref).abs().max().item() > 1e-3


def test_save_hf_round_trip(case, tmp_path):
    name, _, path, tokens, ref = case
    model = load_hf(path)
    save_hf(model, tmp_path / "out")
    back, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(back.eval()(tokens).logits, ref), name


def test_sharded_save_and_load(tmp_path):
    hf = make_hf("mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    model = load_hf(tmp_path / "hf")
    save_hf(model, tmp_path / "ours", max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert INDEX_FILE in files and "model-00001-of-" in files[1], files
    tokens = torch.randint(0, 101, (1, 12))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    reloaded = load_hf(tmp_path / "ours").eval()
    with torch.no_grad():
        ref = hf(tokens).logits
        assert torch.equal(back(tokens).logits, ref)
        assert torch.equal(reloaded(tokens), model.eval()(tokens))


def test_load_in_bfloat16(case):
    _, _, path, tokens, ref = case
    model = load_hf(path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert (model(tokens).float() - ref).abs().max().item() < 0.25 * ref.abs().max().item()


def test_packed_documents_match_each_document_alone(case):
    """Packing (cu_seqlens + restarting positions) gives each document its stand-alone HF logits."""
    _, hf, path, tokens, _ = case
    model = load_hf(path).eval()
    lengths = [13, 11]  # both longer than the window of 8
    docs = [tokens[0, : lengths[0]], tokens[1, : lengths[1]]]
    packed = torch.cat(docs)[None]  # [1, 24]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
        alone = [hf(d[None]).logits[0] for d in docs]
    assert (out[0, : lengths[0]] - alone[0]).abs().max().item() < 1e-4
    assert (out[0, lengths[0] :] - alone[1]).abs().max().item() < 1e-4

"""Llama (issue 11's proof of the model registry): the same bars as Mistral.

References: transformers' ``LlamaForCausalLM`` (logits to 1e-4 in fp32, greedy generation, loading
our ``save_hf`` output) and the single-process model for tensor/data/pipeline layouts (the
existing harnesses of test_parallel_model.py and test_pipeline_executor.py, run with arch llama).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from dist_utils import run_distributed
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.inference import generate
from megatron_lite.models import build_model
from megatron_lite.models.hf_io import HFCheckpointError, load_hf, read_hf_config, save_hf

VOCAB, SEQ = 97, 20
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    attn_implementation="eager",
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=0,
)
# Short original context so every band of the llama3 scaling (kept, interpolated, slowed) is hit.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
CASES = {
    "llama2_mha": dict(num_key_value_heads=4, rope_theta=10000.0),
    "llama3_gqa_scaled": dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "llama3_tied_mqa": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
}


def make_hf(seed: int = 0, **kw) -> LlamaForCausalLM:
    """A tiny random transformers Llama in eval mode, with weights large enough for peaked logits."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    hf = make_hf(**CASES[request.param])
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    return request.param, hf, path, tokens, ref


def test_logits_match_transformers(case):
    name, hf, path, tokens, ref = case
    model = load_hf(path).eval()
    assert model.cfg.arch == "llama" and model.cfg.sliding_window is None
    assert model.cfg.rope_scaling == ("llama3" if "llama3" in name else None)
    with torch.no_grad():
        out = model(tokens)
    assert (out - ref).abs().max().item() < 1e-4, name
    assert ref.abs().max().item() > 0.1


def test_llama3_scaling_changes_the_logits(case):
    """Guard: the scaling matters at these positions (else the test above could not catch its loss)."""
    name, _, path, tokens, ref = case
    if "llama3" not in name:
        pytest.skip("no scaling in this case")
    model = load_hf(path).eval()
    model.cfg.rope_scaling = None
    from megatron_lite.models.common.rope import RotaryEmbedding

    model.rope = RotaryEmbedding(model.cfg.head_dim, model.cfg.rope_theta)
    with torch.no_grad():
        assert (model(tokens) - ref).abs().max().item() > 1e-3


def test_save_hf_round_trip(case, tmp_path):
    name, _, path, tokens, ref = case
    save_hf(load_hf(path), tmp_path / "out")
    back, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert type(back).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert read_hf_config(tmp_path / "out") == read_hf_config(path)
    with torch.no_grad():
        assert torch.equal(back.eval()(tokens).logits, ref), name


def test_greedy_generation_matches_transformers(tmp_path):
    hf = make_hf(seed=2, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert generate(load_hf(tmp_path), prompt, max_new_tokens=20) == ref[:, 13:].tolist()


def test_bad_llama_configs(tmp_path):
    kw = dict(
        arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2
    )
    with pytest.raises(ConfigError, match="model.sliding_window"):
        ModelConfig(**kw, sliding_window=8).validate()
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        ModelConfig(**{**kw, "arch": "mistral"}, rope_scaling="llama3").validate()
    with pytest.raises(ConfigError, match="model.rope_high_freq_factor"):
        ModelConfig(**kw, rope_scaling="llama3", rope_high_freq_factor=0.5).validate()
    hf = make_hf(attention_bias=True)
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(HFCheckpointError, match="attention_bias true is not supported"):
        read_hf_config(tmp_path / "bias")
    make_hf(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}).save_pretrained(
        tmp_path / "y"
    )
    with pytest.raises(HFCheckpointError, match="rope scaling type 'yarn'"):
        read_hf_config(tmp_path / "y")


def test_init_is_layout_independent_and_builds_on_meta():
    cfg = tiny_model_config("llama", vocab_size=64, intermediate_size=14336, max_position_embeddings=32768,
                            num_experts=8, rope_scaling="llama3")  # fmt: skip
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert type(build_model(cfg, "meta")).__name__ == "LlamaModel"


# ---------------------------------------------------------------- layouts (slow: gloo processes)


def _layouts_body(rank, world):
    from test_parallel_model import check_layout as check_tensor_layout
    from test_pipeline_executor import check_layout as check_pipeline_layout

    scaled = dict(rope_scaling="llama3", rope_original_max_position_embeddings=8)
    check_tensor_layout(world, "llama", tp=2, sp=True, **scaled)  # tp 2 x dp 2
    check_pipeline_layout(world, "llama", 4, ["interleaved"], 4, pipeline=2, virtual_pipeline=2, tensor=2,
                          sequence_parallel=True)  # fmt: skip


@pytest.mark.slow
def test_tensor_data_pipeline_layouts_match_single_process():
    run_distributed(_layouts_body, 4)


@pytest.mark.slow
def test_conversion_both_ways(tmp_path):
    """HF Llama -> tp 2 x pp 2 training checkpoint -> HF gives transformers the same logits."""
    from test_convert import _convert, _hf_logits

    make_hf(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, num_hidden_layers=4).save_pretrained(
        tmp_path / "hf"
    )
    layout = ["--tensor", "2", "--pipeline", "2"]
    done = _convert(
        "--input", tmp_path / "hf", "--output", tmp_path / "ckpt", "--to", "megatron_lite", *layout
    )
    assert done.returncode == 0, done.stderr
    back = _convert(
        "--input", tmp_path / "ckpt", "--output", tmp_path / "hf2", "--to", "hf", "--dtype", "fp32"
    )
    assert back.returncode == 0, back.stderr
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_hf_logits(tmp_path / "hf2", tokens), _hf_logits(tmp_path / "hf", tokens))
    assert read_hf_config(tmp_path / "hf2").rope_scaling == "llama3"

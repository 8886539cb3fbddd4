"""HF conversion as data: config mapping, key map iterators, bad input -> one-line errors."""

import json

import pytest
import torch
from conftest import tiny_model_config
from safetensors.torch import load_file, save_file

from megatron_lite.config import ModelConfig
from megatron_lite.models import build_model
from megatron_lite.models.hf_io import (
    INDEX_FILE,
    SINGLE_FILE,
    HFCheckpointError,
    canonical_names,
    canonical_to_hf,
    hf_config_to_model_config,
    hf_state_to_canonical,
    load_hf,
    model_config_to_hf_config,
    save_hf,
)


def tiny_cfg(arch="mistral", **kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=16, intermediate_size=24, num_experts=3)
    return tiny_model_config(arch, **{**base, **kw})


@pytest.fixture
def saved(tmp_path):
    """A small Mistral checkpoint written by save_hf: (path, model)."""
    model = build_model(tiny_cfg(sliding_window=5), seed=3)
    save_hf(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def one_line_error(fn, match: str) -> str:
    with pytest.raises(HFCheckpointError, match=match) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text and err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__  # no chained traceback
    return text


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
@pytest.mark.parametrize("tie", [False, True])
def test_key_map_round_trip(arch, tie):
    cfg = tiny_cfg(arch, tie_embeddings=tie)
    state = dict(build_model(cfg, seed=1).state_dict())
    assert sorted(canonical_names(cfg)) == sorted(state)
    hf = dict(canonical_to_hf(state, cfg))
    assert ("lm_head.weight" in hf) == (not tie)
    back = dict(hf_state_to_canonical(hf.__getitem__, cfg))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    only = dict(hf_state_to_canonical(hf.__getitem__, cfg, names=["layers.1.attention.wqkv.weight"]))
    assert list(only) == ["layers.1.attention.wqkv.weight"]


def test_mixtral_expert_layout():
    """experts.w13[e] = [w1_e (gate); w3_e (up)], experts.w2[e] = w2_e, router = gate."""
    cfg = tiny_cfg("mixtral")
    state = dict(build_model(cfg, seed=1).state_dict())
    hf = dict(canonical_to_hf(state, cfg))
    w13, f = state["layers.1.feed_forward.experts.w13"], cfg.intermediate_size
    moe = "model.layers.1.block_sparse_moe"
    assert torch.equal(hf[f"{moe}.experts.2.w1.weight"], w13[2, :f])
    assert torch.equal(hf[f"{moe}.experts.2.w3.weight"], w13[2, f:])
    assert torch.equal(hf[f"{moe}.experts.0.w2.weight"], state["layers.1.feed_forward.experts.w2"][0])
    assert torch.equal(hf[f"{moe}.gate.weight"], state["layers.1.feed_forward.router.weight"])
    qkv = state["layers.0.attention.wqkv.weight"]
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], qkv[16:24])


def test_config_round_trip_and_hf_defaults():
    cfg = tiny_cfg("mixtral", sliding_window=None, rope_theta=777.0, aux_loss_coeff=0.02, tie_embeddings=True)
    hf = model_config_to_hf_config(cfg, torch.bfloat16)
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["dtype"] == "bfloat16"
    assert hf["sliding_window"] is None and hf["router_aux_loss_coef"] == 0.02
    back = hf_config_to_model_config(json.loads(json.dumps(hf)))
    for field in (
        "vocab_size",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "rope_theta",
        "sliding_window",
        "tie_embeddings",
        "num_experts",
        "top_k",
        "aux_loss_coeff",
        "rms_norm_eps",
    ):
        assert getattr(back, field) == getattr(cfg, field), field
    # Absent keys take transformers' defaults for the architecture; classic top-level rope_theta.
    minimal = {"architectures": ["MistralForCausalLM"], "num_hidden_layers": 2}
    m = hf_config_to_model_config(minimal)
    assert (m.sliding_window, m.rope_theta, m.rms_norm_eps, m.num_kv_heads) == (4096, 10000.0, 1e-6, 32)
    x = hf_config_to_model_config({"model_type": "mixtral", "rope_theta": 5e5, "head_dim": None})
    assert (x.arch, x.sliding_window, x.rope_theta, x.head_dim) == ("mixtral", None, 5e5, 128)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"model_type": "gpt2"}, "unsupported architecture 'gpt2'"),
        (
            {"architectures": ["MistralForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2}},
            "rope scaling",
        ),
        ({"architectures": ["MistralForCausalLM"], "hidden_act": "gelu"}, "hidden_act"),
        (
            {"architectures": ["MistralForCausalLM"], "num_attention_heads": 6, "num_key_value_heads": 4},
            "not divisible",
        ),
        (
            {"architectures": ["MistralForCausalLM"], "hidden_size": "big"},
            r"hidden_size \('big'\) must be an",
        ),
        ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 4.0}, "num_local_experts"),
        ({"architectures": ["MixtralForCausalLM"], "num_experts_per_tok": 9}, r"top_k \(9\)"),
        ({"architectures": ["MistralForCausalLM"], "tie_word_embeddings": "yes"}, "must be a bool"),
    ],
)
def test_bad_config_values(tmp_path, bad, match):
    (tmp_path / "config.json").write_text(json.dumps(bad))
    text = one_line_error(lambda: load_hf(tmp_path), match)
    assert "config.json" in text


def test_missing_and_malformed_files(tmp_path, saved):
    path, _ = saved
    one_line_error(lambda: load_hf(tmp_path / "nope"), "not a directory")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_hf(tmp_path / "empty"), "config.json: missing")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    one_line_error(lambda: load_hf(tmp_path / "empty"), "config.json: malformed JSON")
    (tmp_path / "empty" / "config.json").write_text((path / "config.json").read_text())
    one_line_error(lambda: load_hf(tmp_path / "empty"), f"no {SINGLE_FILE} or {INDEX_FILE}")
    (tmp_path / "empty" / SINGLE_FILE).write_bytes(b"garbage, not safetensors")
    one_line_error(lambda: load_hf(tmp_path / "empty"), "cannot read safetensors")


def test_missing_tensor_names_file_and_tensor(saved):
    path, _ = saved
    tensors = load_file(path / SINGLE_FILE)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, path / SINGLE_FILE)
    text = one_line_error(lambda: load_hf(path), "missing tensor model.layers.1.self_attn.v_proj.weight")
    assert SINGLE_FILE in text and "[8, 16]" in text


def test_wrong_shape_names_both_shapes(saved):
    path, _ = saved
    tensors = load_file(path / SINGLE_FILE)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(20, 16)
    save_file(tensors, path / SINGLE_FILE)
    text = one_line_error(lambda: load_hf(path), "model.layers.0.mlp.up_proj.weight has shape")
    assert "[20, 16]" in text and "[24, 16]" in text and str(path / SINGLE_FILE) in text


def test_unexpected_tensor_and_missing_shard(saved):
    path, _ = saved
    tensors = load_file(path / SINGLE_FILE)
    tensors["model.layers.2.input_layernorm.weight"] = torch.ones(16)  # config says 2 layers
    save_file(tensors, path / SINGLE_FILE)
    one_line_error(lambda: load_hf(path), "unexpected tensor model.layers.2.input_layernorm.weight")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (path / INDEX_FILE).write_text(json.dumps(index))
    one_line_error(lambda: load_hf(path), "lists shard model-00001-of-00002.safetensors")
    (path / INDEX_FILE).write_text("[]")
    one_line_error(lambda: load_hf(path), "malformed index")


def test_save_hf_guards(saved, tmp_path):
    path, model = saved
    one_line_error(lambda: save_hf(model, path), "not empty")
    save_hf(model, path, dtype=torch.bfloat16, overwrite=True)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(path / SINGLE_FILE)["model.norm.weight"].dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    stage = build_model(model.cfg, seed=0, layer_ids=[0], post_process=False)
    one_line_error(lambda: save_hf(stage, tmp_path / "stage"), "whole model")
    state = dict(model.state_dict())
    state["layers.0.attention.wo.weight"] = state["layers.0.attention.wo.weight"][:, :8]  # a TP shard
    with pytest.raises(HFCheckpointError, match=r"wo.weight has shape \[16, 8\].*\[16, 16\]"):
        list(canonical_to_hf(state, model.cfg))
    partial = {k: v for k, v in state.items() if k.startswith("layers.1.")}
    assert len(list(canonical_to_hf(partial, model.cfg, strict=False))) == 9  # 2 norms, q k v o, gate up down

"""Streaming conversion: bit-identical round trips, dtype handling, complete HF exports, CLI guards.

References: the source tensors themselves (round trips must be bit-identical), transformers'
``AutoTokenizer`` / ``pipeline`` for the exported directory, SentencePiece for token ids.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ModelConfig, config_from_dict
from megatron_lite.models.hf_files import SafetensorsReader, write_safetensors
from megatron_lite.models.hf_io import hf_tensor_specs, model_config_to_hf_config
from megatron_lite.training.convert import write_model_checkpoint
from megatron_lite.training.convert_stream import CheckpointSource, HFSource

REPO = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools/convert_checkpoint.py")
convert_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_tool)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_attention_heads=4,
            num_kv_heads=2, max_position_embeddings=64)  # fmt: skip


def _convert(capsys, *args) -> tuple[int, str]:
    rc = convert_tool.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _random_hf(path: Path, dtype=torch.bfloat16, extra_config=None, **overrides) -> ModelConfig:
    """An HF directory of random weights written straight to safetensors (as the benchmark does)."""
    cfg = ModelConfig(**{**TINY, **overrides})
    path.mkdir(parents=True)
    config = {**model_config_to_hf_config(cfg, dtype), **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(1)
    specs = hf_tensor_specs(cfg)
    write_safetensors(
        path, specs, ((n, torch.randn(s, generator=gen).to(dtype)) for n, s in specs), dtype, 2**14
    )
    return cfg


def _assert_same_tensors(a: Path, b: Path) -> None:
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        assert sorted(ra.keys()) == sorted(rb.keys())
        for k in ra.keys():
            assert ra(k).dtype == rb(k).dtype and torch.equal(ra(k), rb(k)), k


def test_round_trip_bit_identical_and_complete_config(tmp_path, capsys):
    """bf16 HF -> tp2 x pp2 (bf16 kept) -> HF: same tensors, config/generation/tokenizer files kept."""
    extra = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "custom_key": "kept"}
    _random_hf(tmp_path / "hf", extra_config=extra, tie_embeddings=True)
    (tmp_path / "hf/generation_config.json").write_text(
        '{"bos_token_id": 1, "eos_token_id": 2, "top_p": 0.9}'
    )
    (tmp_path / "hf/tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    rc, log = _convert(capsys, "--input", tmp_path / "hf", "--output", tmp_path / "ckpt", "--to",
                       "megatron_lite", "--tensor", "2", "--pipeline", "2")  # fmt: skip
    assert rc == 0, log
    source = CheckpointSource(tmp_path / "ckpt")
    assert source.dtype() == torch.bfloat16 and len(source.files) == 4
    rc, log = _convert(capsys, "--input", tmp_path / "ckpt", "--output", tmp_path / "back", "--to", "hf")
    assert rc == 0, log
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    config = json.loads((tmp_path / "back/config.json").read_text())
    assert {k: config[k] for k in extra} == extra and config["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "back/generation_config.json").read_text())["top_p"] == 0.9
    assert (tmp_path / "back/tokenizer_config.json").is_file()


def test_dtype_change_and_layout_to_layout(tmp_path, capsys):
    """bf16 -> fp32 checkpoint (ep2 x tp2) -> another layout -> bf16 HF: lossless, so bit-identical."""
    _random_hf(tmp_path / "hf", arch="mixtral", num_experts=4)
    steps = [
        ("hf", "a", ["--to", "megatron_lite", "--dtype", "fp32", "--tensor", "2", "--expert", "2"]),
        ("a", "b", ["--to", "megatron_lite", "--pipeline", "2", "--expert", "4"]),
        ("b", "back", ["--to", "hf", "--dtype", "bf16", "--max-shard-gb", "0.00002"]),
    ]
    for src, dst, flags in steps:
        rc, log = _convert(capsys, "--input", tmp_path / src, "--output", tmp_path / dst, *flags)
        assert rc == 0, log
    assert CheckpointSource(tmp_path / "b").dtype() == torch.float32
    assert (tmp_path / "back/model.safetensors.index.json").is_file()  # several files
    _assert_same_tensors(tmp_path / "hf", tmp_path / "back")


def test_guards_before_reading(tmp_path, capsys):
    """Bad layout refused without reading tensors; --overwrite; directories named for what they lack."""
    _random_hf(tmp_path / "hf")
    (tmp_path / "hf/model.safetensors").write_bytes(b"not safetensors at all")
    rc, log = _convert(capsys, "--input", tmp_path / "hf", "--output", tmp_path / "o", "--to",
                       "megatron_lite", "--tensor", "3")  # fmt: skip
    assert rc == 1 and "(3)" in log and "safetensors" not in log and not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    rc, log = _convert(capsys, "--input", tmp_path / "empty", "--output", tmp_path / "o", "--to", "hf")
    assert rc == 1 and "neither a Hugging Face checkpoint" in log and "holds nothing" in log
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only/config.json").write_text("{}")
    rc, log = _convert(capsys, "--input", tmp_path / "cfg_only", "--output", tmp_path / "o", "--to", "hf")
    assert rc == 1 and "model.safetensors" in log and "holds config.json" in log
    _random_hf(tmp_path / "hf2")
    args = ["--input", tmp_path / "hf2", "--output", tmp_path / "out", "--to", "megatron_lite"]
    assert _convert(capsys, *args)[0] == 0
    rc, log = _convert(capsys, *args)
    assert rc == 1 and "--overwrite" in log and "overwrite=True" not in log
    rc, log = _convert(capsys, *args, "--overwrite", "--tensor", "2")
    assert rc == 0, log
    assert sorted(p.name for p in (tmp_path / "out/iter_0000000").glob("mp_rank_*")) == [
        "mp_rank_00",
        "mp_rank_01",
    ]
    hf_args = ["--input", tmp_path / "out", "--output", tmp_path / "hf_out", "--to", "hf"]
    assert _convert(capsys, *hf_args)[0] == 0
    rc, log = _convert(capsys, *hf_args)
    assert rc == 1 and "--overwrite" in log
    assert _convert(capsys, *hf_args, "--overwrite")[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def _tiny_sentencepiece(tmp_path: Path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    words = "the quick brown fox jumps over a lazy dog and runs home".split()
    text = [" ".join(words[i % 7 :] + words[: i % 7]) for i in range(200)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(tmp_path / "sp"), vocab_size=56, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return tmp_path / "sp.model"


def test_export_builds_tokenizer_from_the_run(tmp_path):
    """A run trained with a SentencePiece tokenizer exports files AutoTokenizer and pipeline() load
    (Llama2Tokenizer: BOS added to each text, as in training)."""
    import sentencepiece

    from megatron_lite.models import build_model

    sp_model = _tiny_sentencepiece(tmp_path)
    cfg = config_from_dict({
        "model": {**TINY, "vocab_size": 64},
        "data": {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": str(sp_model), "mock": True},
    })  # fmt: skip
    model = build_model(cfg.model, "cpu", dtype=torch.float32, seed=0)
    write_model_checkpoint(dict(model.state_dict()), cfg, tmp_path / "ckpt")
    assert (
        convert_tool.main(["--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"), "--to", "hf"])
        == 0
    )
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    text = "the lazy dog runs over the fox"
    assert tok(text).input_ids == [1, *sp.encode(text)]
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    generated = pipe("the quick", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated.startswith("the quick")


def test_export_follows_initial_load_and_copies_hf_tokenizers(tmp_path):
    """A run started from HF (training.initial_load) exports with the HF directory's config and
    files; a run with an HF tokenizer (tokenizer.json) exports that tokenizer."""
    _random_hf(tmp_path / "hf", extra_config={"bos_token_id": 5, "eos_token_id": 6, "custom_key": 1})
    (tmp_path / "hf/tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    source = HFSource(tmp_path / "hf")
    cfg = config_from_dict({**source.config.to_dict(), "training": {"initial_load": str(tmp_path / "hf")}})
    write_model_checkpoint(source.get, cfg, tmp_path / "trained")  # stands for a run's checkpoint
    assert (
        convert_tool.main(
            ["--input", str(tmp_path / "trained"), "--output", str(tmp_path / "a"), "--to", "hf"]
        )
        == 0
    )
    config = json.loads((tmp_path / "a/config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["custom_key"]) == (5, 6, 1)
    assert (tmp_path / "a/tokenizer_config.json").read_text() == '{"tokenizer_class": "LlamaTokenizer"}'

    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, "<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    data = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(tmp_path / "tok"), "mock": True}
    cfg = config_from_dict({"model": source.config.to_dict()["model"], "data": data})
    write_model_checkpoint(source.get, cfg, tmp_path / "trained_hf_tok")
    source.close()
    args = ["--input", str(tmp_path / "trained_hf_tok"), "--output", str(tmp_path / "b"), "--to", "hf"]
    assert convert_tool.main(args) == 0
    assert json.loads((tmp_path / "b/config.json").read_text())["eos_token_id"] == 2
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert loaded("a a").input_ids == [3, 3]


def test_initial_load_from_another_layout_reads_lazily(tmp_path, capsys):
    """training.initial_load of a tp2 x pp2 checkpoint into a one-process model: the HF weights."""
    from megatron_lite.models import build_model
    from megatron_lite.training.convert import layout_dims, load_initial_weights

    _random_hf(tmp_path / "hf", dtype=torch.float32)
    rc, log = _convert(capsys, "--input", tmp_path / "hf", "--output", tmp_path / "ckpt", "--to",
                       "megatron_lite", "--tensor", "2", "--pipeline", "2")  # fmt: skip
    assert rc == 0, log
    source = HFSource(tmp_path / "hf")
    model = build_model(source.config.model, "cpu", dtype=torch.float32, seed=0)
    what = load_initial_weights(model, tmp_path / "ckpt", source.config, layout_dims())
    assert what == "checkpoint iteration 0 (resharded)"
    for name, param in model.named_parameters():
        assert torch.equal(param, source.get(name)), name

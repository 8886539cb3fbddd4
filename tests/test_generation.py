"""Generation: rolling-buffer KV cache, chunked prefill, sampling, greedy parity with transformers."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from hf_tiny import save_tiny_hf_model
from transformers import MistralConfig, MistralForCausalLM

from megatron_lite.inference import (
    KVCache,
    UnsupportedCheckpointError,
    generate,
    load_model_for_inference,
    sample_next,
)
from megatron_lite.models import build_model
from megatron_lite.models.hf_io import load_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import generate as generate_tool  # noqa: E402

VOCAB = 89


def tiny_model(window=None, arch="mistral", seed=0):
    cfg = tiny_model_config(
        arch, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=window, init_std=0.2
    )
    return build_model(cfg, seed=seed).eval()


def hf_model(arch: str, window, path, seed=0):
    """A tiny random HF model saved to ``path`` (see ``hf_tiny``)."""
    return save_tiny_hf_model(arch, window, path, VOCAB, seed)


@pytest.mark.parametrize("arch, window", [("mistral", 6), ("mistral", None), ("mixtral", 5)])
def test_greedy_matches_transformers(arch, window, tmp_path):
    """Prompt 17 + 16 new tokens: with a window, prefill runs in chunks and the ring buffer wraps."""
    hf = hf_model(arch, window, tmp_path)
    prompt = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    ours = generate(load_hf(tmp_path), prompt, max_new_tokens=16)
    assert ours == ref[:, 17:].tolist()


@pytest.mark.parametrize("window", [None, 4, 7])
@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_chunked_cache_logits_equal_full_forward(window, chunk):
    """Feeding the sequence through the cache in chunks gives the full-sequence logits."""
    model = tiny_model(window)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=20)
    with torch.no_grad():
        full = model(tokens)
        parts = []
        for start in range(0, 20, chunk):
            piece = tokens[:, start : start + chunk]
            pos = torch.arange(start, start + piece.shape[1]).expand(2, -1)
            parts.append(model(piece, position_ids=pos, cache=cache))
    assert cache.seq_len == 20 and (cache.capacity == 20 if window is None else cache.capacity == window)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5


def test_greedy_equals_recompute_and_ragged_batches():
    model = tiny_model(window=5, arch="mixtral")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3]]
    out = generate(model, prompts, max_new_tokens=9)
    for prompt, new in zip(prompts, out):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(9):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert new == seq[0, len(prompt) :].tolist()
    assert generate(model, prompts[1], max_new_tokens=9) == out[1]


def test_eos_stops_and_is_kept():
    model = tiny_model()
    first = generate(model, [3, 4, 5], max_new_tokens=1)
    assert generate(model, [3, 4, 5], max_new_tokens=10, eos_id=first[0]) == first
    rows = generate(model, [[3, 4, 5], [9, 8, 7]], max_new_tokens=6, eos_id=first[0])
    assert rows[0] == first and len(rows[1]) <= 6


def test_sampling_controls():
    model = tiny_model()
    greedy = generate(model, [1, 2, 3], max_new_tokens=6)
    assert generate(model, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, [1, 2, 3], max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=0) == greedy
    a = generate(model, [1, 2, 3], max_new_tokens=6, temperature=2.0, seed=7)
    assert a == generate(model, [1, 2, 3], max_new_tokens=6, temperature=2.0, seed=7)
    assert all(0 <= t < VOCAB for t in a)
    # top_p keeps the smallest prefix reaching p: probs [.5, .3, .2] with p=.6 -> tokens 0 and 1 only.
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(400, 3)
    picks = sample_next(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"must be in \[0, 89\)"):
        generate(model, [1, 200], max_new_tokens=2)
    cache = KVCache.for_model(model, batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        with torch.no_grad():
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_loader_and_tool(tmp_path, capsys):
    with pytest.raises(UnsupportedCheckpointError, match="unsupported checkpoint"):
        load_model_for_inference(tmp_path)
    # A vocab-32000 model so the bundled Mistral tokenizer (mistral_common) fits it.
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=4,
    )
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    assert not load_model_for_inference(tmp_path / "hf").training
    rc = generate_tool.main(
        [
            "--load",
            str(tmp_path / "hf"),
            "--tokenizer-model",
            "bundled",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "5",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert (
        rc == 0 and out[0] == "prompt 1:     The capital of France is" and out[1].startswith("completion 1: ")
    )
    rc = generate_tool.main(["--load", str(tmp_path), "--tokenizer-model", "bundled", "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unsupported checkpoint" in err
    # --stop: cut the first completion after a stop string taken from its own middle.
    completion = out[1][len("completion 1: ") :]
    stop = completion[len(completion) // 2 :][:3]
    args = ["--load", str(tmp_path / "hf"), "--tokenizer-model", "bundled", "--max-new-tokens", "5"]
    assert generate_tool.main([*args, "--prompt", "The capital of France is", "--stop", stop]) == 0
    cut = capsys.readouterr().out.splitlines()[1][len("completion 1: ") :]
    assert stop in cut and completion.startswith(cut) and len(cut) <= len(completion)
    assert generate_tool.main([*args, "--prompt", "x", "--tensor-parallel", "2"]) == 2
    assert "needs torch.distributed initialised" in capsys.readouterr().err

"""Tokenizers: bundled Mistral model, plain SentencePiece, HuggingFace tokenizer.json, errors."""

from __future__ import annotations

import json
import os

import pytest
from data_common import mistral

from megatron_lite.data.tokenizers import build_tokenizer, bundled_mistral_tokenizer_path


def test_bundled_mistral_tokenizer():
    path = bundled_mistral_tokenizer_path()
    assert path.endswith(os.path.join("mistral_common", "data", "tokenizer.model.v1"))
    tok = mistral()
    assert (tok.vocab_size, tok.bos, tok.eod) == (32000, 1, 2)
    ids = tok.tokenize("Hello world, this is Mistral.")
    assert ids[0] == tok.bos and tok.eod not in ids
    assert tok.detokenize(ids + [tok.eod]) == "Hello world, this is Mistral."
    assert tok.encode_raw("Hello") == ids[1:2]
    assert tok.pad == tok.eod  # the model has no pad piece


def test_llama2_and_plain_sentencepiece():
    path = bundled_mistral_tokenizer_path()
    llama = build_tokenizer("Llama2Tokenizer", path)
    plain = build_tokenizer("SentencePieceTokenizer", path)
    text = "Sliding window attention"
    assert llama.tokenize(text) == [1, *plain.tokenize(text)]
    assert plain.eod == 2 and plain.detokenize(plain.tokenize(text)) == text


def test_tiny_sentencepiece_trained_on_the_fly(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tiny"),
        vocab_size=60,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
    )
    tok = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "tiny.model"))
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (60, 2, 1, 3)
    assert tok.detokenize(tok.tokenize("the lazy fox")) == "the lazy fox"


def make_hf_tokenizer(directory, vocab_size: int, with_config: bool = True) -> str:
    """A word-level tokenizer.json with ``vocab_size`` entries (specials first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    if with_config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}, f)
    return str(directory)


def test_huggingface_tokenizer_file_and_directory(tmp_path):
    d = make_hf_tokenizer(tmp_path / "hf", 100)
    for model in (d, os.path.join(d, "tokenizer.json")):
        tok = build_tokenizer("HuggingFaceTokenizer", model)
        assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (100, 2, 1, 3)
        assert tok.tokenize("w0 w5 w95") == [4, 9, 99]
        assert tok.detokenize([4, 9, 99]) == "w0 w5 w95"


def test_huggingface_without_config_uses_known_names(tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer", make_hf_tokenizer(tmp_path / "hf", 10, with_config=False))
    assert (tok.eod, tok.bos, tok.pad) == (2, 1, 3)


def test_unknown_type_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer_type 'GPT2BPETokenizer'"):
        build_tokenizer("GPT2BPETokenizer", "x")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))

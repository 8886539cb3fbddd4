"""Shared by the objective tests: a tiny preference corpus, its preprocessing, run configs."""

from __future__ import annotations

import json
import os
import random
import sys

from tiny import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))


def make_word_tokenizer(directory) -> str:
    """A word-level tokenizer.json of 256 entries (``w0`` ..), specials first (eos 2, pad 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(252)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}, f)
    return str(directory)


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(f"w{rng.randint(0, 251)}" for _ in range(rng.randint(low, high)))


def preference_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": words(rng, 3, 8), "chosen": words(rng, 2, 9), "rejected": words(rng, 2, 9)}
        for _ in range(n)
    ]


def preprocess_pairs(tmp_path, n: int = 24, extra: tuple = ()) -> tuple[str, str]:
    """(dataset prefix ``<tmp>/prefs_text_document``, tokenizer dir) of ``n`` random pairs."""
    import preprocess_data

    tok = make_word_tokenizer(tmp_path / "tok")
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in preference_records(n)))
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "prefs"), "--preference"]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--log-interval", "0"]
    assert preprocess_data.main([*argv, *extra]) == 0
    return str(tmp_path / "prefs_text_document"), tok


def dpo_args(prefix: str, tok: str) -> list[str]:
    """Overrides of a tiny DPO run on ``prefix`` (2 pairs per microbatch, 4 per iteration)."""
    return [
        *TINY_MODEL,
        *("--data.path", prefix, "--data.tokenizer_type", "HuggingFaceTokenizer"),
        *("--data.tokenizer_model", tok, "--data.seq_length", "24", "--data.split", "75,25,0"),
        *("--training.objective", "dpo", "--training.dpo_beta", "0.5"),
        *("--training.micro_batch_size", "2", "--training.global_batch_size", "4"),
        *("--training.train_iters", "3", "--optimizer.lr", "1e-2", "--optimizer.lr_warmup_iters", "0"),
        *("--logging.log_interval", "1000", "--training.eval_interval", "100", "--training.eval_iters", "1"),
    ]

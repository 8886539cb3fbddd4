"""bf16 vs fp32 over a real (test-sized) run: tiny Mistral and tiny Mixtral on the bundled corpus.

The corpus is the quickstart's (``examples/make_corpus.py``: the Python standard library's
docstrings), tokenized with Mistral's own tokenizer (``mistral-common``'s ``tokenizer.model.v1``).
To keep the run test-sized on a CPU, where bf16 matrix products are about 10x slower than fp32,
the vocabulary is compacted: the ``--vocab`` - 1 most frequent Mistral token ids of the corpus
keep their order of frequency as new ids and every other id becomes one shared "rare" id (the
real segmentation and text statistics stay; the embedding and output layer shrink from 32000
rows). The same samples, in the same order, from the same fp32 initial weights, train once with
``training.precision fp32`` and once with ``bf16`` (bf16 weights and activations, fp32 main
grads/params/Adam); the script prints the first and the final losses (mean of the last
``--tail`` iterations) and the relative gap of bf16 to fp32.

    python benchmarks/bench_precision_parity.py [--iters 200] [--json out.json]

Results are recorded in benchmarks/RESULTS.md ("bf16 vs fp32 parity").
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "mistral": ["--model.arch", "mistral"],
    "mixtral": ["--model.arch", "mixtral", "--model.num_experts", "4", "--model.top_k", "2"],
}


def _corpus_docs(max_docs: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "examples/make_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    docs = []
    for _name, doc in corpus.iter_docstrings(min_chars=200):
        docs.append(doc)
        if len(docs) >= max_docs:
            break
    return docs


def build_dataset(prefix: str, max_docs: int, vocab: int) -> dict:
    """Tokenize the corpus with the bundled Mistral tokenizer, compact ids, write ``prefix``.bin/.idx.

    Returns:
        ``{"docs", "tokens", "coverage"}``: documents, tokens, and the fraction of tokens whose
        Mistral id kept its own row (the rest share the rare id).
    """
    from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_lite.data.tokenizers import MistralTokenizer, bundled_mistral_tokenizer_path

    tokenizer = MistralTokenizer(bundled_mistral_tokenizer_path())
    docs = [[*tokenizer.tokenize(d), tokenizer.eod] for d in _corpus_docs(max_docs)]
    freq = collections.Counter(t for d in docs for t in d)
    keep = [t for t, _ in freq.most_common(vocab - 1)]  # new id i = i-th most frequent; rare = vocab-1
    table = np.full(tokenizer.vocab_size, vocab - 1, dtype=np.int64)
    table[keep] = np.arange(len(keep))
    with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for doc in docs:
            builder.add_document(table[np.asarray(doc)])
    total = sum(freq.values())
    coverage = sum(freq[t] for t in keep) / total
    return {"docs": len(docs), "tokens": total, "coverage": coverage, "eod": int(table[tokenizer.eod])}


def _common(args) -> list[str]:
    return [
        *("--model.vocab_size", str(args.vocab), "--model.hidden_size", "64"),
        *("--model.intermediate_size", "128", "--model.num_layers", "2"),
        *("--model.num_attention_heads", "4", "--model.num_kv_heads", "2"),
        *("--model.max_position_embeddings", str(args.seq)),
        *("--data.mock", "true", "--data.seq_length", str(args.seq)),
        *("--training.micro_batch_size", str(args.batch), "--training.global_batch_size", str(args.batch)),
        *("--training.train_iters", str(args.iters), "--training.seed", "1234"),
        *("--optimizer.lr", "3e-3", "--optimizer.min_lr", "3e-4", "--optimizer.lr_warmup_iters", "10"),
        *("--optimizer.weight_decay", "0.01", "--logging.log_interval", "100000"),
    ]


def train_losses(prefix: str, eod: int, arch: str, precision: str, args) -> list[float]:
    """Per-iteration losses of one run on the compacted corpus."""
    from megatron_lite.config import load_config
    from megatron_lite.data.builder import build_gpt_datasets
    from megatron_lite.training.data import BatchStream
    from megatron_lite.training.runtime import check_run_config, init_runtime
    from megatron_lite.training.setup import setup_training

    cfg = load_config(None, [*_common(args), *MODEL[arch], "--training.precision", precision])
    check_run_config(cfg, 1)
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    # The trainer was built on mock data (its tokenizer check wants the 32000-row vocabulary);
    # serve it the compacted corpus through the framework's own GPT dataset and batch stream.
    n = args.iters * args.batch
    train, _, _ = build_gpt_datasets([prefix], "100,0,0", args.seq, (n, 0, 0), 1234)
    trainer.train_stream = BatchStream(train, 0, args.batch, 1, 0, 1, cfg.data, eod, trainer.runtime.device)
    return [r.loss for r in trainer.train()]


def run(args) -> dict:
    """Build the dataset, train every (arch, precision); -> numbers for printing and tests."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus_text_document")
        out = {"data": build_dataset(prefix, args.docs, args.vocab), "runs": {}}
        for arch in args.archs:
            row = {}
            for precision in ("fp32", "bf16"):
                start = time.perf_counter()
                losses = train_losses(prefix, out["data"]["eod"], arch, precision, args)
                row[precision] = {
                    "first": losses[0],
                    "final": float(np.mean(losses[-args.tail :])),
                    "seconds": time.perf_counter() - start,
                }
            row["gap"] = abs(row["bf16"]["final"] - row["fp32"]["final"]) / row["fp32"]["final"]
            out["runs"][arch] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tail", type=int, default=20, help="final loss = mean of the last TAIL iterations")
    p.add_argument("--docs", type=int, default=800, help="corpus documents")
    p.add_argument("--vocab", type=int, default=1024, help="compacted vocabulary (incl. the rare id)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="samples per iteration")
    p.add_argument("--archs", nargs="+", default=["mistral", "mixtral"], choices=sorted(MODEL))
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = run(args)
    d = result["data"]
    print(
        f"corpus: {d['docs']} docs, {d['tokens']} Mistral tokens, vocab compacted to {args.vocab} "
        f"({d['coverage']:.1%} of tokens keep their own id); {args.iters} iterations of "
        f"{args.batch} x {args.seq} tokens"
    )
    print(
        f"{'model':8} {'fp32 first':>10} {'fp32 final':>10} {'bf16 final':>10} {'gap':>7} {'s fp32/bf16':>12}"
    )
    for arch, r in result["runs"].items():
        print(
            f"{arch:8} {r['fp32']['first']:10.4f} {r['fp32']['final']:10.4f} {r['bf16']['final']:10.4f} "
            f"{r['gap']:7.2%} {r['fp32']['seconds']:5.1f}/{r['bf16']['seconds']:<5.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

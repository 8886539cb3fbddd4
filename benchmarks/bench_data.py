#!/usr/bin/env python
"""Data pipeline benchmark (CPU): preprocessing throughput per worker count, index build times.

    python benchmarks/bench_data.py                    # defaults: ~25 MB corpus, 10M-document index
    python benchmarks/bench_data.py --docs 5000 --index-docs 1000000   # quick

Part 1 tokenizes a synthetic JSONL corpus with tools/preprocess_data.py (bundled Mistral
tokenizer, --append-eod) for each worker count, plus one run with all cleaning steps on.
Part 2 builds GPTDataset indices (document, sample, shuffle) for synthetic document lengths with
the C++ helpers, then blending indices and first-fit-decreasing packing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_lite.data import helpers  # noqa: E402
from megatron_lite.data.gpt_dataset import build_indices  # noqa: E402
from megatron_lite.data.indexed_dataset import IndexedDataset  # noqa: E402


def make_corpus(path: str, docs: int, seed: int = 0) -> int:
    """Synthetic English-like JSONL corpus (~1-3 KB per document); returns its size in bytes."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("etaoinshrdlcumwfgypbvkjxqz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    with open(path, "w") as f:
        for _ in range(docs):
            words = rng.choices(vocab, k=rng.randint(150, 450))
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
    return os.path.getsize(path)


def run_preprocess(corpus: str, out: str, workers: int, extra: list[str]) -> tuple[float, float, str]:
    """One preprocess_data.py run in a fresh process.

    Returns:
        (wall seconds, CPU seconds of the run and its workers, throughput line).
    """
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "preprocess_data.py"),
        "--input",
        corpus,
        "--output-prefix",
        out,
        "--tokenizer-type",
        "MistralTokenizer",
        "--tokenizer-model",
        "bundled",
        "--append-eod",
        "--workers",
        str(workers),
        "--log-interval",
        "0",
        *extra,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("throughput"))
    removed = next((ln for ln in res.stderr.splitlines() if ln.startswith("removed")), "")
    return wall, cpu, line + ("  | " + removed if extra else "")


def bench_preprocess(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        size = make_corpus(corpus, args.docs)
        print(f"## preprocessing: {args.docs} docs, {size / 1e6:.1f} MB, MistralTokenizer, --append-eod")
        tokens = None
        for w in args.workers:
            wall, cpu, line = run_preprocess(corpus, os.path.join(tmp, f"w{w}"), w, [])
            tokens = tokens or IndexedDataset(os.path.join(tmp, f"w{w}_text_document")).num_tokens
            print(
                f"workers={w}: wall {wall:.1f}s (incl. start-up), {cpu:.1f} CPU-s "
                f"({tokens / cpu / 1e6:.2f}M tokens per CPU-s) | {line}"
            )
        clean = [
            "--dedup-exact",
            "--dedup-minhash",
            "--min-chars",
            "50",
            "--max-symbol-ratio",
            "0.3",
            "--max-repetition-ratio",
            "0.5",
        ]
        w = max(args.workers)
        wall, cpu, line = run_preprocess(corpus, os.path.join(tmp, "clean"), w, clean)
        print(f"workers={w} + all cleaning: wall {wall:.1f}s, {cpu:.1f} CPU-s | {line}")


def timed(fn, *a):
    start = time.time()
    out = fn(*a)
    return out, time.time() - start


def bench_indices(args) -> None:
    rng = np.random.default_rng(0)
    n = args.index_docs
    sizes = np.clip(rng.lognormal(6.0, 1.0, n), 1, 100_000).astype(np.int32)  # mean ~660 tokens
    docs = np.arange(n, dtype=np.int64)
    tokens = int(sizes.sum(dtype=np.int64))
    seq = args.seq_length
    print(f"\n## index build: {n:,} documents, {tokens / 1e9:.2f}B tokens, seq_length {seq}")
    samples = (tokens - 1) // seq
    start = time.time()
    doc_index, t_doc = timed(helpers.build_document_index, docs, 1, 1234, False)
    sample_index, t_sample = timed(helpers.build_sample_index, sizes, doc_index, seq, samples)
    shuffle_index, t_shuffle = timed(helpers.build_shuffle_index, samples, samples, 1234)
    print(
        f"document index {t_doc:.2f}s | sample index ({samples:,} samples) {t_sample:.2f}s | "
        f"shuffle index {t_shuffle:.2f}s | total {time.time() - start:.2f}s"
    )
    want = int(1.5 * samples)  # 2 epochs, last one separate
    arrays, t_all = timed(build_indices, sizes, docs, seq, want, 1234)
    print(
        f"GPTDataset indices for {want:,} samples (2 epochs, final separate): {t_all:.2f}s, "
        f"{sum(a.nbytes for a in arrays.values()) / 1e6:.0f} MB"
    )
    _, t_blend = timed(helpers.build_blending_indices, [0.5, 0.3, 0.2], n)
    print(f"blending indices, 3 datasets, {n:,} samples: {t_blend:.2f}s")
    lengths = rng.integers(16, seq, args.pack_items)
    bins, t_pack = timed(helpers.ffd_pack, lengths, seq)
    fill = lengths.sum() / ((bins.max() + 1) * seq)
    print(
        f"FFD packing {args.pack_items:,} examples into {bins.max() + 1:,} rows of {seq}: "
        f"{t_pack:.2f}s, fill {fill:.1%}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=12000, help="documents in the preprocessing corpus")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--index-docs", type=int, default=10_000_000)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--pack-items", type=int, default=1_000_000)
    p.add_argument("--skip-preprocess", action="store_true")
    args = p.parse_args()
    if helpers.compiled_helpers() is None:
        sys.exit("megatron_lite._C is not built: pip install --no-build-isolation -e .")
    print(f"CPU cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}")
    if not args.skip_preprocess:
        bench_preprocess(args)
    bench_indices(args)


if __name__ == "__main__":
    main()

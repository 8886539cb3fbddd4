#!/usr/bin/env python
"""Tokenize JSONL corpora into Megatron MMIDIDX datasets (``<prefix>_<key>_document.bin/.idx``).

Examples::

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/web \\
        --tokenizer-type MistralTokenizer --tokenizer-model bundled --append-eod --workers 8

    # instruction data (prompt/response or chat messages) with a loss mask, packed to 4096
    python tools/preprocess_data.py --input sft.jsonl --output-prefix data/sft --instruction \\
        --tokenizer-type MistralTokenizer --pack-seq-length 4096

    # DPO preference pairs {"prompt", "chosen", "rejected"}: chosen/rejected as sequences 2i/2i+1
    python tools/preprocess_data.py --input prefs.jsonl --output-prefix data/prefs --preference \
        --tokenizer-type MistralTokenizer

Outputs appear only when the run completes; progress and throughput go to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.cleaning import QualityFilter  # noqa: E402
from megatron_lite.data.preprocess import PreprocessError, PreprocessOptions  # noqa: E402
from megatron_lite.data.preprocess_run import run_preprocess  # noqa: E402
from megatron_lite.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command line flags (Megatron's names where Megatron has the flag)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input/output")
    g.add_argument("--input", nargs="+", required=True, help="JSONL / .jsonl.gz files or globs")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (one dataset each)")
    g.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="stop",
        help="malformed line / missing key: skip it (reported) or stop the run",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model, tokenizer.json or its directory; 'bundled' = mistral_common's",
    )
    g.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    g.add_argument(
        "--partitions", type=int, default=1, help="split the input, process parts in parallel, merge"
    )
    g.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    g = p.add_argument_group("cleaning")
    g.add_argument("--dedup-exact", action="store_true", help="drop documents whose exact text was seen")
    g.add_argument("--dedup-minhash", action="store_true", help="drop near duplicates (MinHash LSH)")
    g.add_argument(
        "--minhash-threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate"
    )
    g.add_argument("--minhash-num-perm", type=int, default=128)
    g.add_argument(
        "--minhash-bands", type=int, default=None, help="LSH bands (default: tuned to the threshold)"
    )
    g.add_argument("--minhash-rows", type=int, default=None, help="LSH rows per band")
    g.add_argument("--minhash-ngram", type=int, default=5, help="words per shingle")
    g.add_argument("--min-chars", type=int, default=None)
    g.add_argument("--max-chars", type=int, default=None)
    g.add_argument(
        "--max-symbol-ratio",
        type=float,
        default=None,
        help="max fraction of non-space characters that are not letters/digits",
    )
    g.add_argument(
        "--max-repetition-ratio",
        type=float,
        default=None,
        help="max fraction of word trigrams repeating an earlier one",
    )
    g = p.add_argument_group("instruction data")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--instruction", action="store_true", help="prompt/response or messages records")
    mode.add_argument(
        "--instruction-augmented",
        action="store_true",
        help="text + instruction_pairs records (Instruction Pre-Training)",
    )
    mode.add_argument(
        "--preference",
        action="store_true",
        help="DPO pairs: prompt + chosen + rejected records (TRL's names), loss mask on the responses",
    )
    g.add_argument("--mix-input", nargs="+", default=[], help="general instruction data mixed in")
    g.add_argument(
        "--mix-ratio", type=float, default=0.0, help="fraction of output examples from --mix-input"
    )
    g.add_argument(
        "--pack-seq-length",
        type=int,
        default=None,
        help="pack examples (first-fit decreasing) into rows of this many tokens (= training seq_length)",
    )
    g.add_argument("--pack-buffer", type=int, default=100_000, help="examples packed together")
    return p


def options_from_args(args: argparse.Namespace) -> PreprocessOptions:
    """PreprocessOptions of parsed flags."""
    mode = "instruction" if args.instruction else "augmented" if args.instruction_augmented else "text"
    mode = "preference" if args.preference else mode
    return PreprocessOptions(
        inputs=args.input,
        output_prefix=args.output_prefix,
        json_keys=args.json_keys,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        log_interval=args.log_interval,
        on_error=args.on_error,
        mode=mode,
        mix_inputs=args.mix_input,
        mix_ratio=args.mix_ratio,
        pack_seq_length=args.pack_seq_length,
        pack_buffer=args.pack_buffer,
        quality=QualityFilter(
            args.min_chars, args.max_chars, args.max_symbol_ratio, args.max_repetition_ratio
        ),
        dedup_exact=args.dedup_exact,
        dedup_minhash=args.dedup_minhash,
        minhash_threshold=args.minhash_threshold,
        minhash_num_perm=args.minhash_num_perm,
        minhash_bands=args.minhash_bands,
        minhash_rows=args.minhash_rows,
        minhash_ngram=args.minhash_ngram,
    )


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run preprocessing; returns the exit status (1 with a one-line message on bad input)."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # clean up temporary files when killed
    try:
        run_preprocess(options_from_args(args))
    except (PreprocessError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

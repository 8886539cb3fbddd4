#!/usr/bin/env python
"""Synthesize instruction data with a model: Magpie or Instruction Pre-Training.

    # Magpie: an aligned chat model writes queries from its template's pre-query prefix, then answers
    python tools/synthesize.py magpie --load /ckpt/Mistral-7B-Instruct --chat-template mistral \\
        --output sft.jsonl --limit 10000 --temperature 1.0 --max-new-tokens 512
    python tools/preprocess_data.py --input sft.jsonl --instruction ...

    # Instruction Pre-Training: a synthesizer writes <QUE>/<ANS>/</END> pairs for each raw text
    python tools/synthesize.py instruction-pretraining --load /ckpt/instruction-synthesizer \\
        --input corpus.jsonl --output augmented.jsonl --temperature 0 --max-new-tokens 400
    python tools/preprocess_data.py --input augmented.jsonl --instruction-augmented ...

``--load`` is a Hugging Face directory or a training checkpoint directory. The tokenizer is the
one in ``--load`` (tokenizer.json, else tokenizer.model) unless ``--tokenizer-model`` is given.
Re-running with the same ``--output`` resumes after its last complete record (a torn last line
is dropped). Progress and skipped records (with their reason) go to stderr; errors in the input
are one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _common(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="Hugging Face directory or training checkpoint directory")
    g.add_argument(
        "--tokenizer-type",
        default=None,
        help="default: HuggingFaceTokenizer for tokenizer.json, else MistralTokenizer",
    )
    g.add_argument("--tokenizer-model", default=None, help="tokenizer file (default: the one in --load)")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="JSONL file (resumed if it exists)")
    g.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines")


def build_parser() -> argparse.ArgumentParser:
    """Command line: one sub-command per method."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="method", required=True)
    m = sub.add_parser(
        "magpie", help="instructions from the chat template's pre-query prefix, then responses"
    )
    _common(m, temperature=1.0)
    m.add_argument("--chat-template", required=True, help="mistral, llama3, or a JSON/YAML file")
    m.add_argument("--limit", type=int, required=True, help="records the output should hold")
    m.add_argument("--max-attempts", type=int, default=None, help="default: 20 x --limit")
    m.add_argument(
        "--keep-unfinished",
        action="store_true",
        help="keep texts that hit --max-new-tokens before their end of turn (default: skip them)",
    )
    m.add_argument("--min-instruction-chars", type=int, default=1)
    m.add_argument("--max-instruction-chars", type=int, default=None)
    m.add_argument("--min-response-chars", type=int, default=1)
    m.add_argument("--max-response-chars", type=int, default=None)
    i = sub.add_parser("instruction-pretraining", help="instruction-response pairs for each raw text")
    _common(i, temperature=0.0)
    i.add_argument("--input", required=True, help="JSONL corpus of raw texts")
    i.add_argument("--text-key", default="text")
    i.add_argument(
        "--prompt-template",
        default=None,
        help="synthesizer prompt with a {text} field (default: the released synthesizer's)",
    )
    i.add_argument("--limit", type=int, default=None, help="process at most this many input records")
    return p


def load_tokenizer(load: str, tokenizer_type: str | None, tokenizer_model: str | None):
    """The tokenizer named by the flags, else the one stored in the model directory (an HF
    directory's tokenizer.json / tokenizer.model, or a training checkpoint's run config)."""
    from megatron_lite.data.tokenizers import build_tokenizer

    if tokenizer_model is not None:
        return build_tokenizer(tokenizer_type or "MistralTokenizer", tokenizer_model)
    for name, default_type in (
        ("tokenizer.json", "HuggingFaceTokenizer"),
        ("tokenizer.model", "MistralTokenizer"),
    ):
        if os.path.isfile(os.path.join(load, name)):
            return build_tokenizer(tokenizer_type or default_type, os.path.join(load, name))
    data = _training_run_data_config(load)
    if data is not None:
        return build_tokenizer(tokenizer_type or data["tokenizer_type"], data.get("tokenizer_model"))
    raise FileNotFoundError(
        f"{load}: no tokenizer.json, tokenizer.model or training run config inside; give --tokenizer-model"
    )


def _training_run_data_config(load: str) -> dict | None:
    """``data`` section of a training checkpoint's stored run config (None if there is none)."""
    import yaml

    from megatron_lite.training.checkpoint import iteration_dir, latest_iteration

    iteration = latest_iteration(load) if os.path.isdir(load) else None
    path = iteration_dir(load, iteration) / "config.yaml" if iteration is not None else None
    if path is None or not path.is_file():
        return None
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    return data if data.get("tokenizer_type") else None


def _stop_ids(tokenizer, stops: list[str]) -> tuple[int, ...]:
    """Ids of stop strings that are one token (special tokens decoding would drop)."""
    from megatron_lite.synthesis import encode_with_specials

    ids = [encode_with_specials(tokenizer, s) for s in stops]
    return tuple(i[0] for i in ids if len(i) == 1)


def run(args: argparse.Namespace, generator=None, tokenizer=None):
    """Run the chosen method; ``generator``/``tokenizer`` override the model (the test seam)."""
    from megatron_lite.synthesis import (
        IPTOptions,
        MagpieOptions,
        SamplingOptions,
        load_template,
        model_text_generator,
        run_instruction_pretraining,
        run_magpie,
    )
    from megatron_lite.synthesis.instruction_pretraining import SYNTHESIZER_PROMPT

    sampling = SamplingOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    sampling.validate()
    template = load_template(args.chat_template) if args.method == "magpie" else None
    if tokenizer is None:
        tokenizer = load_tokenizer(args.load, args.tokenizer_type, args.tokenizer_model)
    max_prompt_tokens = None  # IPT texts whose prompt does not fit the model are skipped, counted
    if generator is None:
        from megatron_lite.inference import load_model_for_inference

        model = load_model_for_inference(args.load, dtype=_DTYPES[args.dtype], device=args.device)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.cfg.vocab_size}"
            )
        max_prompt_tokens = model.cfg.max_position_embeddings - sampling.max_new_tokens
        if max_prompt_tokens < 1:
            raise ValueError(
                f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's "
                f"max_position_embeddings ({model.cfg.max_position_embeddings})"
            )
        stops = template.instruction_stops() + template.response_stops() if template else []
        generator = model_text_generator(model, tokenizer, sampling, _stop_ids(tokenizer, stops))
    if args.method == "magpie":
        opts = MagpieOptions(
            args.output, args.limit, args.batch_size, args.seed, args.min_instruction_chars,
            args.max_instruction_chars, args.min_response_chars, args.max_response_chars,
            args.max_attempts, args.keep_unfinished, args.log_interval,
        )  # fmt: skip
        return run_magpie(generator, tokenizer, template, opts)
    opts = IPTOptions(
        args.input, args.output, args.text_key, args.limit, args.batch_size, args.seed,
        args.prompt_template or SYNTHESIZER_PROMPT, max_prompt_tokens, args.log_interval,
    )  # fmt: skip
    return run_instruction_pretraining(generator, tokenizer, opts)


def main(argv=None, generator=None, tokenizer=None) -> int:
    """Parse flags and run; one ``error:`` line and status 2 on bad input."""
    args = parse_args(argv)
    from megatron_lite.inference import load_errors

    try:
        run(args, generator, tokenizer)
    except load_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed command line."""
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())

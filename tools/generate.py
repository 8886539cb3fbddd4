#!/usr/bin/env python
"""Generate text from a checkpoint.

    python tools/generate.py --load /ckpt/Mistral-7B-v0.1 \\
        --tokenizer-model /ckpt/Mistral-7B-v0.1/tokenizer.model --prompt "The capital of France is" \\
        --max-new-tokens 32 [--temperature 0.7 --top-k 50 --top-p 0.9 --seed 0]

``--load`` is a Hugging Face directory (config.json + safetensors) or a training checkpoint
directory (any tp/pp/ep layout; the latest iteration). Each prompt is printed as
``prompt N: ...`` followed by ``completion N: ...`` (the generated text only). Errors in the input
are reported as one line, exit status 2. All prompts are decoded together as one ragged batch
(``megatron_lite.inference.generate_batch``); ``--stop`` ends a completion at a stop string.

Tensor-parallel inference (every rank holds 1/N of the weights; rank 0 prints)::

    torchrun --nproc-per-node 2 tools/generate.py --load /ckpt --tensor-parallel 2 ...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Hugging Face directory or training checkpoint directory")
    p.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file ('bundled': the Mistral tokenizer in mistral_common)",
    )
    p.add_argument(
        "--tokenizer-type",
        default="MistralTokenizer",
        help="MistralTokenizer (adds BOS) or SentencePieceTokenizer (no BOS)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="tp size (run under torchrun)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load_tokenizer(tokenizer_type: str, model_file: str):
    """The tokenizer named on the command line (``bundled``: Mistral's, from mistral_common)."""
    from megatron_lite.data.tokenizers import build_tokenizer

    return build_tokenizer(tokenizer_type, model_file)


def main(argv=None) -> int:
    """Load, generate, print each prompt and its completion, labelled."""
    args = parse_args(argv)
    from megatron_lite.inference import generate_batch, load_errors, load_model_for_inference

    rank = _init_distributed(args)
    try:
        tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_model)
        model = load_model_for_inference(
            args.load, dtype=_DTYPES[args.dtype], device=args.device, tensor_parallel=args.tensor_parallel
        )
        prompts = [tokenizer.tokenize(text) for text in args.prompt]
        outputs = generate_batch(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=tokenizer.eod,
            stop_strings=args.stop,
            decode=tokenizer.detokenize,
            seed=args.seed,
        )
    except load_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        for k, (ids, new) in enumerate(zip(prompts, outputs), 1):
            print(format_sample(k, tokenizer.detokenize(ids), tokenizer.detokenize(ids + new)), flush=True)
    return 0


def _init_distributed(args) -> int:
    """Join the torchrun process group for ``--tensor-parallel`` > 1; return this rank."""
    if args.tensor_parallel <= 1 or "WORLD_SIZE" not in os.environ:
        return 0  # tp > 1 without torchrun: load_model_for_inference says so in one line
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    return dist.get_rank()


def format_sample(k: int, prompt: str, full: str) -> str:
    """``prompt k:`` and ``completion k:`` lines; the completion is the text after the prompt's
    (detokenized together, so a word-initial space survives; BOS/EOS are dropped)."""
    completion = full[len(prompt) :] if full.startswith(prompt) else full
    return f"prompt {k}:     {prompt}\ncompletion {k}: {completion}"


if __name__ == "__main__":
    sys.exit(main())

"""Generated tokens/s of ``megatron_lite.inference.generate_batch`` against transformers' ``generate``.

One small random MistralForCausalLM is saved to a temporary HF directory; transformers runs it
(its default SDPA attention, dynamic KV cache) and we load the same directory. Both decode the
same ragged batch greedily (transformers with left padding and an attention mask, as its docs
prescribe for batched decoder-only generation), and every row must be identical before timing,
so a faster wrong generator cannot pass. No EOS: every row generates exactly ``--new-tokens``.
The sides are timed in turns (A B A B ...) on this process's CPU time (one thread), and the
result is the median of the per-round ratios with its spread.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py               # hidden 384, 4 layers, batch 8
    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py --window 32   # sliding window < prompt + new
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

import torch

from megatron_lite.inference import generate_batch, load_model_for_inference
from megatron_lite.ops.benchmark_utils import interleaved_ms, ratio_summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--window", type=int, default=None, help="sliding window (default: full attention)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="rounds of (ours, transformers)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def build_hf(args, path: str):
    """The random transformers model, saved to ``path`` (peaked logits: no greedy near-ties)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        sliding_window=args.window,
        max_position_embeddings=4096,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.eval().save_pretrained(path)
    return model


def ragged_prompts(args) -> list[list[int]]:
    """``--batch`` prompts of random lengths in [min, max] (seeded), the longest included."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,), generator=g).tolist()
    lengths[0] = args.max_prompt
    return [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in lengths]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate on the left-padded batch; the new tokens of each row."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[:, longest:].tolist()


def main(argv: list[str] | None = None) -> int:
    """Check equal outputs, time both in turns, print one JSON line."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = ragged_prompts(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf(args, tmp)
        ours = load_model_for_inference(tmp)
    mine = generate_batch(ours, prompts, max_new_tokens=args.new_tokens)
    theirs = hf_generate(hf, prompts, args.new_tokens)
    same = sum(a == b for a, b in zip(mine, theirs))
    if same != len(prompts):
        print(f"error: outputs differ in {len(prompts) - same} of {len(prompts)} rows", file=sys.stderr)
        return 1
    fns = {
        "ours": lambda: generate_batch(ours, prompts, max_new_tokens=args.new_tokens),
        "transformers": lambda: hf_generate(hf, prompts, args.new_tokens),
    }
    ms = interleaved_ms(fns, torch.device("cpu"), warmup=args.warmup, iters=args.iters, cpu_clock=True)
    generated = args.batch * args.new_tokens
    tps = {k: statistics.median(generated / (t / 1000) for t in v) for k, v in ms.items()}
    ratio = ratio_summary(ms["ours"], ms["transformers"])  # transformers time / ours: >1 we are faster
    result = {
        "model": f"mistral h{args.hidden} ffn{args.ffn} L{args.layers} heads{args.heads}/{args.kv_heads} "
        f"V{args.vocab} window={args.window}",
        "batch": args.batch,
        "prompt_lengths": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "rows_equal": same,
        "ours_tokens_per_s_median": round(tps["ours"], 1),
        "transformers_tokens_per_s_median": round(tps["transformers"], 1),
        "speedup_median": round(ratio["median"], 3),
        "speedup_min": round(ratio["min"], 3),
        "speedup_max": round(ratio["max"], 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

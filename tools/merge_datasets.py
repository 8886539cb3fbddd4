#!/usr/bin/env python
"""Concatenate MMIDIDX datasets into one: ``--input prefixA prefixB ... --output-prefix merged``.

Inputs must share a token dtype. Loss-mask datasets beside the inputs (``<p>_<key>_loss_mask``)
are merged too when every input has one. The output appears only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.gpt_dataset import loss_mask_prefix  # noqa: E402
from megatron_lite.data.indexed_dataset import IndexedDataset, concatenate_datasets  # noqa: E402


def merge(inputs: list[str], output_prefix: str) -> None:
    """Merge datasets ``inputs`` (in order) into ``output_prefix``."""
    if not inputs:
        raise ValueError("--input needs at least one dataset prefix")
    dtype = IndexedDataset(inputs[0]).dtype
    jobs = [(inputs, output_prefix, dtype)]
    masks = [loss_mask_prefix(p) for p in inputs]
    if all(masks):
        out = output_prefix[: -len("_document")] if output_prefix.endswith("_document") else output_prefix
        jobs.append((masks, out + "_loss_mask", IndexedDataset(masks[0]).dtype))
    concatenate_datasets(jobs)


def main(argv: list[str] | None = None) -> int:
    """Command line entry; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    try:
        merge(args.input, args.output_prefix)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ds = IndexedDataset(args.output_prefix)
    print(
        f"merged {len(args.input)} datasets into {args.output_prefix}: {len(ds)} sequences, "
        f"{ds.num_tokens} tokens",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

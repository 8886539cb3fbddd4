#!/usr/bin/env python
"""Checkpoint conversion at scale (CPU): wall time and peak RSS of tools/convert_checkpoint.py.

    python benchmarks/bench_convert.py                      # ~1.5B bf16 Mistral, 24 and 12 layers
    python benchmarks/bench_convert.py --layers 4 --hidden 512 --ffn 1792   # quick

A bf16 Mistral is written straight to safetensors from random tensors (one tensor in memory at a
time, no torch model is built), in files of at most ``--input-shard-gb``. Then, each in a child
process whose peak RSS is read with ``getrusage(RUSAGE_CHILDREN)`` by a wrapper process:
HF -> training checkpoint tp2 x pp2, and that checkpoint -> HF (files of at most
``--input-shard-gb`` again). The goal: peak RSS at most the largest single file read or written
plus 1 GiB, and not growing with the number of layers. The round trip is checked bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_lite.config import ModelConfig  # noqa: E402
from megatron_lite.models.hf_files import write_safetensors  # noqa: E402
from megatron_lite.models.hf_io import hf_tensor_specs, model_config_to_hf_config  # noqa: E402

GiB = 2**30


def write_random_hf(cfg: ModelConfig, out: Path, shard_bytes: int) -> int:
    """A bf16 HF checkpoint of random weights; returns the number of parameters."""
    out.mkdir(parents=True)
    specs = hf_tensor_specs(cfg)
    (out / "config.json").write_text(json.dumps(model_config_to_hf_config(cfg, torch.bfloat16)))
    gen = torch.Generator().manual_seed(0)
    tensors = ((name, torch.randn(shape, generator=gen).mul_(0.02).bfloat16()) for name, shape in specs)
    write_safetensors(out, specs, tensors, torch.bfloat16, shard_bytes)
    return sum(math.prod(s) for _, s in specs)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh wrapper process; returns (wall seconds, child's peak RSS in GiB)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    wall, kib = done.stdout.strip().splitlines()[-1].split()
    return float(wall), int(kib) / 2**20


def largest_file(root: Path) -> float:
    """Size of the largest file under ``root`` in GiB."""
    return max(p.stat().st_size for p in root.rglob("*") if p.is_file()) / GiB


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two HF directories hold bit-identical tensors (names, dtypes, values)."""
    from megatron_lite.models.hf_files import SafetensorsReader

    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        if sorted(ra.keys()) != sorted(rb.keys()):
            return False
        return all(torch.equal(ra(k), rb(k)) and ra(k).dtype == rb(k).dtype for k in ra.keys())


def run(layers: int, args, work: Path) -> dict:
    """One model size: generate, convert both ways, check; returns the row of numbers."""
    cfg = ModelConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_layers=layers,
        num_attention_heads=args.heads,
        num_kv_heads=args.kv_heads,
    )
    shutil.rmtree(work, ignore_errors=True)
    hf, ckpt, back = work / "hf", work / "ckpt", work / "hf_back"
    t = time.perf_counter()
    params = write_random_hf(cfg, hf, int(args.input_shard_gb * GiB))
    gen_s = time.perf_counter() - t
    tool = [sys.executable, str(REPO / "tools/convert_checkpoint.py")]
    to_ckpt = measure([*tool, "--input", str(hf), "--output", str(ckpt), "--to", "megatron_lite",
                       "--tensor", "2", "--pipeline", "2"])  # fmt: skip
    to_hf = measure([*tool, "--input", str(ckpt), "--output", str(back), "--to", "hf",
                     "--max-shard-gb", str(args.input_shard_gb)])  # fmt: skip
    row = {
        "layers": layers,
        "params_B": params / 1e9,
        "hf_GiB": sum(p.stat().st_size for p in hf.glob("*.safetensors")) / GiB,
        "largest_hf_file_GiB": largest_file(hf),
        "largest_ckpt_file_GiB": largest_file(ckpt),
        "generate_s": gen_s,
        "hf_to_tp2pp2_s": to_ckpt[0],
        "hf_to_tp2pp2_peak_GiB": to_ckpt[1],
        "tp2pp2_to_hf_s": to_hf[0],
        "tp2pp2_to_hf_peak_GiB": to_hf[1],
        "bit_identical": same_tensors(hf, back),
    }
    shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[24, 12])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=7168)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--input-shard-gb", type=float, default=1.0)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    base = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    rows = [run(n, args, base / f"l{n}") for n in args.layers]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"(the benchmark process itself, which reads both HF directories to compare them: {baseline:.2f} GiB)"
    )
    print("| layers | params | HF size | largest file (HF / ckpt) | HF->tp2xpp2 | tp2xpp2->HF | round trip |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        budget = max(r["largest_hf_file_GiB"], r["largest_ckpt_file_GiB"]) + 1
        print(
            f"| {r['layers']} | {r['params_B']:.2f} B | {r['hf_GiB']:.2f} GiB | "
            f"{r['largest_hf_file_GiB']:.2f} / {r['largest_ckpt_file_GiB']:.2f} GiB | "
            f"{r['hf_to_tp2pp2_s']:.0f} s, peak {r['hf_to_tp2pp2_peak_GiB']:.2f} GiB | "
            f"{r['tp2pp2_to_hf_s']:.0f} s, peak {r['tp2pp2_to_hf_peak_GiB']:.2f} GiB | "
            f"{'bit-identical' if r['bit_identical'] else 'DIFFERS'} (budget {budget:.2f} GiB) |"
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The MoE layer benchmark runs on CPU at tiny shapes and checks agreement with transformers first."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/bench_moe_layer.py"


def test_bench_moe_layer_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_moe_layer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--dtype", "fp32", "--tokens", "64", "--hidden", "32", "--ffn", "48"]
    assert bench.main([*argv, "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["max_rel_err"] < 1e-4 and result["ours_ms"] > 0
    assert result["transformers_experts"] == "grouped_mm"  # transformers' fastest, not its eager loop
    assert result["speedup_spread"]["min"] <= result["speedup"] <= result["speedup_spread"]["max"]

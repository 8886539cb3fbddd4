"""bench_train.py on its tiny CPU configs: same weights on both sides, interleaved rounds, Mixtral too."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_bench_train_tiny_mixtral_starts_both_models_from_the_same_weights(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--mixtral", "--warmup", "1", "--iters", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ours, theirs = result["results"]
    assert (ours["model"], theirs["model"]) == ("megatron_lite", "hf_mixtral_grouped_mm")
    assert ours["first_loss"] == pytest.approx(theirs["first_loss"], rel=1e-5)
    assert result["speedup"]["min"] <= result["speedup"]["median"] <= result["speedup"]["max"]

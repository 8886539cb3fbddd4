"""bf16 training follows fp32 over a real run: tiny Mistral and Mixtral on the bundled corpus.

Runs benchmarks/bench_precision_parity.py at its recorded settings (200 iterations of 4 x 32
tokens, the quickstart corpus tokenized by Mistral's tokenizer, vocabulary compacted to 1024 ids):
the bf16 final loss (mean of the last 20 iterations) must be within 2% of the fp32 one, and both
must have learned (the loss falls well below its start), so the comparison is not between two
runs that did nothing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("mistral_common")
pytest.importorskip("sentencepiece")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/bench_precision_parity.py"


@pytest.mark.slow
def test_bf16_final_loss_within_2_percent_of_fp32(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_precision_parity", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "parity.json"
    assert bench.main(["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for arch, run in result["runs"].items():
        assert run["gap"] < 0.02, (arch, run)
        for precision in ("fp32", "bf16"):
            assert run[precision]["final"] < run[precision]["first"] - 1.0, (arch, precision, run)

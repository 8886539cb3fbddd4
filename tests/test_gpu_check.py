"""benchmarks/gpu_check.py --dry-run: the GPU-hour script walks every step on CPU and writes its summary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEPS = ["env", "build", "gpu_tests", "nccl", "train_mistral", "train_mixtral", "host_syncs", "moe_layer",
         "train_bench"]  # fmt: skip


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_walks_every_step_and_skips_the_gpu_parts(tmp_path):
    assert load().main([str(tmp_path), "--dry-run"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS and summary["dry_run"] is True
    assert steps["env"]["status"] == "ok" and steps["env"]["details"]["torch"]
    assert (tmp_path / "logs" / "env.log").is_file()
    for name in STEPS[1:]:
        assert steps[name]["status"] == "skipped", steps[name]
        assert "arguments checked" in steps[name]["details"]["why"]


def test_dry_run_fails_a_step_whose_arguments_no_longer_work(tmp_path, monkeypatch):
    gpu_check = load()
    monkeypatch.setattr(gpu_check, "TRAIN_ARGS", [*gpu_check.TRAIN_ARGS, "--training.no_such_field", "1"])
    monkeypatch.setattr(gpu_check, "MIXTRAL_ARGS", [])
    assert gpu_check.main([str(tmp_path), "--dry-run", "--only", "train_mistral", "moe_layer"]) == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "summary.json").read_text())["steps"]}
    assert (
        steps["train_mistral"]["status"] == "failed"
        and "no_such_field" in steps["train_mistral"]["details"]["dry_check"]
    )
    assert steps["moe_layer"]["status"] == "skipped"

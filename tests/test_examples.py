"""The example configs and launch layouts stay valid (checked without starting any process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.parallel.dims import validate_layout
from megatron_lite.training.runtime import check_run_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BLEND = ["--data.path", "0.7", "/data/web_text_document", "0.3", "/data/code_text_document"]
SLURM_MIXTRAL = ["--parallel.pipeline", "4", "--parallel.virtual_pipeline", "2"]


@pytest.mark.parametrize(
    "config,world,extra",
    [
        ("quickstart_tiny_mistral.yaml", 1, ["--data.path", "x_text_document"]),
        ("mistral_7b.yaml", 8, BLEND),  # one node: tp 4 x dp 2
        ("mistral_7b.yaml", 64, [*BLEND, "--parallel.pipeline", "2", "--parallel.schedule", "interleaved"]),
        # examples/launch/slurm_mixtral_8x7b.sbatch: 8 nodes x 8 GPUs, tp 2 x ep 8 x pp 4, dp 8
        ("mixtral_8x7b.yaml", 64, [*BLEND, *SLURM_MIXTRAL, "--parallel.schedule", "breadth-first"]),
    ],
)
def test_example_layouts_are_valid(config, world, extra):
    cfg = load_config(EXAMPLES / "configs" / config, ["--training.device", "cpu", *extra])
    dp = check_run_config(cfg, world)
    dims = validate_layout(cfg.model, cfg.parallel, world, cfg.data.seq_length)
    assert dims.dp == dp and dims.tp * dims.pp * dims.dp == world
    if BLEND[1] in extra:  # the blend's weights and prefixes arrive in order
        assert [str(x) for x in cfg.data.path] == BLEND[1:]


def test_launch_scripts_exist_and_name_real_configs():
    for script in (EXAMPLES / "launch").iterdir():
        text = script.read_text()
        for word in text.split():
            if word.startswith("examples/configs/"):
                assert (EXAMPLES.parent / word).is_file(), (script.name, word)

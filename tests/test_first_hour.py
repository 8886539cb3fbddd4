"""First-hour friction: a run shorter than log_interval still reports; the tiny Mixtral example."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_training_logging import TRAIN_RE

from megatron_lite.config import load_config
from megatron_lite.pretrain import main as pretrain_main
from megatron_lite.training.runtime import check_run_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {
    "model": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
              "num_attention_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 32},
    "data": {"mock": True, "seq_length": 16},
    "training": {"micro_batch_size": 2, "train_iters": 3},
}  # fmt: skip


def test_short_run_logs_last_iteration_and_summary(tmp_path, capsys):
    """train_iters 3 < log_interval 10 (the default): iteration 3 is logged, then one summary line."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["--config", str(config), "--logging.run_dir", str(tmp_path / "run")]
    assert pretrain_main([*args, "--training.save", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert [int(m["it"]) for m in TRAIN_RE.finditer(out)] == [3]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("training done: 3 iterations (0 -> 3), 96 tokens,"), summary  # 3 x 2 x 16
    assert "s wall time" in summary and f"checkpoint: {tmp_path / 'ckpt' / 'iter_0000003'}" in summary
    assert pretrain_main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("no checkpoint (training.save is not set)"), last


def test_tiny_mixtral_example_is_valid_for_the_quickstart():
    cfg = load_config(EXAMPLES / "configs/quickstart_tiny_mixtral.yaml", ["--data.path", "x_text_document"])
    assert cfg.model.arch == "mixtral" and cfg.parallel.expert == 2
    assert check_run_config(cfg, 2) == 2  # two processes: expert parallel 2 over data parallel 2

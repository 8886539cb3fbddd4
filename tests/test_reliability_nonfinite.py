"""Non-finite drills: a learning rate that blows the model up stops the run instead of training on
skipped steps and saving wrecked weights; fp16 stops after too many consecutive skips; the log
and the metric writers show the real (nan) loss."""

from __future__ import annotations

import math
import re

import pytest
from test_reliability_checkpoint import BASE, run

from megatron_lite.config import load_config
from megatron_lite.training import checkpoint
from megatron_lite.training.health import TrainingError
from megatron_lite.training.logging import MetricWriters
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_fp32_nonfinite_stops_without_saving(tmp_path, capsys, precision):
    """lr 1e6: the first non-finite iteration ends the run with one line naming it and the first
    parameter with a non-finite gradient; no checkpoint at or after it."""
    ckpt = tmp_path / "ckpt"
    args = ["--optimizer.lr", "1e6", "--training.train_iters", "20", "--training.save", str(ckpt)]
    args += ["--training.precision", precision]
    rc, out, err = run(tmp_path, capsys, *args, "--training.save_interval", "1")
    assert rc == 1 and err.count("\n") == 1, err
    m = re.match(
        r"training error: non-finite values at iteration (\d+): lm loss (\S+), grad norm (\S+); ", err
    )
    assert m, err
    bad = int(m[1])
    assert "first non-finite gradient: " in err and err.rstrip().endswith("(nothing saved from this state)")
    assert not (math.isfinite(float(m[2])) and math.isfinite(float(m[3])))
    assert checkpoint.latest_iteration(ckpt) == bad - 1
    assert not list(ckpt.glob(f"iter_{bad:07d}*")) and not list(ckpt.glob("*.tmp"))
    (line,) = [x for x in out.splitlines() if x.startswith(f" iteration {bad:8d}/")]
    assert "nan" in line.lower()  # the bad iteration is logged with its real values, not 0.0


class Recorder(MetricWriters):
    """What the trainer hands to TensorBoard/wandb (both get the same dict)."""

    def __init__(self):
        super().__init__(None, enabled=False)
        self.values: list[dict] = []

    def scalars(self, values, step):
        self.values.append({"step": step, **values})


def test_fp16_consecutive_skips_stop_and_log_the_real_loss(tmp_path):
    args = [*BASE, "--optimizer.lr", "1e6", "--training.precision", "fp16", "--training.train_iters", "30"]
    args += ["--training.max_consecutive_skips", "3", "--logging.run_dir", str(tmp_path)]
    cfg = load_config(None, args)
    check_run_config(cfg, 1)
    lines: list[str] = []
    trainer = setup_training(cfg, init_runtime(cfg), log=lines.append)
    trainer.writers = Recorder()
    with pytest.raises(
        TrainingError, match=r"^3 consecutive skipped iterations \(training.max_consecutive_skips 3\)"
    ):
        trainer.train()
    skipped = [r for r in trainer.history if r.skipped]
    assert len(skipped) == 3 and trainer.history[-1].skipped and trainer.history[-4:][0].skipped is False
    logged = {v["step"]: v for v in trainer.writers.values}
    for r, step in zip(skipped, range(trainer.iteration - 2, trainer.iteration + 1)):
        assert not math.isfinite(r.loss)  # the overflow is in the loss itself here
        assert math.isnan(logged[step]["lm loss"]) or math.isinf(logged[step]["lm loss"])
        (line,) = [x for x in lines if x.startswith(f" iteration {step:8d}/")]
        assert "lm loss: 0.000000E+00" not in line and re.search(r"lm loss: -?(NAN|INF)", line)

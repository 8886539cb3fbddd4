"""Log line shape (parsed the way Megatron log parsers do), FLOPs/MFU arithmetic, peaks, memory."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model_config

from megatron_lite.config import ConfigError, LoggingConfig, ModelConfig
from megatron_lite.models import build_model
from megatron_lite.training import metrics
from megatron_lite.training.logging import (
    MetricWriters,
    TrainLogStats,
    check_backends,
    format_train_line,
    format_validation_lines,
)

# What Megatron log scrapers match: fixed field names, "|" separators, E-notation losses.
TRAIN_RE = re.compile(
    r"iteration\s+(?P<it>\d+)/\s*(?P<total>\d+) \| consumed samples:\s+(?P<samples>\d+) \|"
    r".*elapsed time per iteration \(ms\): (?P<ms>[\d.]+) \| learning rate: (?P<lr>[\d.]+E[+-]\d+) \|"
    r" global batch size:\s+(?P<gbs>\d+) \| lm loss: (?P<loss>[\d.]+E[+-]\d+) \|"
    r".*grad norm: (?P<gnorm>[\d.]+) \|"
    r".*tokens/s/GPU: (?P<tps>\d+) \| TFLOP/s/GPU: (?P<tflops>[\d.]+) \| MFU: (?P<mfu>[\d.]+%|n/a)"
    r" \| mem: (?P<mem>[\d.]+) GiB"
)
VALID_RE = re.compile(
    r"validation loss at iteration (\d+) \| lm loss value: ([\d.]+E[+-]\d+) \|"
    r" lm loss PPL: ([\d.]+E[+-]\d+) \|"
)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_experts=8)
    return tiny_model_config(**{**base, **kw})


def stats(**kw) -> TrainLogStats:
    base = dict(
        iteration=10,
        train_iters=100,
        consumed_samples=640,
        consumed_tokens=640 * 4096,
        ms_per_iter=123.4,
        lr=2.999999e-4,
        global_batch_size=64,
        lm_loss=4.123456,
        grad_norm=1.234,
        tokens_per_s=12345.0,
        tflops=12.3,
        mfu=1.23,
        mem_gib=1.2,
    )
    base.update(kw)
    return TrainLogStats(**base)


def test_train_line_matches_megatron_shape():
    line = format_train_line(stats())
    assert line.startswith(" iteration       10/     100 | consumed samples:          640 | ")
    assert (
        "| elapsed time per iteration (ms): 123.4 | learning rate: 2.999999E-04 | global batch size:    64 |"
    ) in line
    assert "lm loss: 4.123456E+00 |" in line and line.endswith("MFU: 1.23% | mem: 1.2 GiB")
    m = TRAIN_RE.search(line)
    assert m, line
    assert int(m["it"]) == 10 and int(m["samples"]) == 640 and int(m["gbs"]) == 64
    assert float(m["loss"]) == pytest.approx(4.123456) and float(m["lr"]) == pytest.approx(2.999999e-4)
    assert float(m["gnorm"]) == pytest.approx(1.234) and m["mfu"] == "1.23%" and int(m["tps"]) == 12345


def test_train_line_moe_and_na():
    line = format_train_line(stats(mfu=None, load_balancing_loss=1.01, z_loss=0.5, loss_scale=65536.0))
    assert "load balancing loss: 1.010000E+00 | z loss: 5.000000E-01 | loss scale: 65536.0 |" in line
    m = TRAIN_RE.search(line)
    assert m and m["mfu"] == "n/a"


def test_validation_lines():
    lines = format_validation_lines(50, {"lm loss": 2.0})
    assert lines[0] == lines[2] == "-" * len(lines[1])
    m = VALID_RE.search(lines[1])
    assert m and int(m[1]) == 50 and float(m[2]) == 2.0 and float(m[3]) == pytest.approx(7.389056, rel=1e-6)


def test_flops_dense_by_hand():
    cfg = tiny_model_cfg()
    # per layer: wqkv 64 x (4 + 2*2) * 16 = 8192, wo 64*64 = 4096, SwiGLU 3*64*128 = 24576, 2 norms 128
    per_layer = 8192 + 4096 + 24576 + 128
    assert metrics.layer_params(cfg) == per_layer == 36992
    n = 2 * per_layer + 64 + 256 * 64  # + final norm + output layer (the embedding is excluded)
    assert metrics.flops_params(cfg) == n == 90432
    assert metrics.flops_per_token(cfg, 32) == 6 * 90432 + 12 * 2 * 64 * 32 == 591744
    model = build_model(cfg)
    assert metrics.total_params(cfg) == sum(p.numel() for p in model.parameters()) == 90432 + 256 * 64


def test_flops_moe_counts_active_experts():
    cfg = tiny_model_cfg(arch="mixtral", num_experts=4, top_k=2)
    per_layer = 8192 + 4096 + 2 * 24576 + 64 * 4 + 128  # two active experts + full router
    assert metrics.flops_per_token(cfg, 32) == 6 * (2 * per_layer + 64 + 256 * 64) + 12 * 2 * 64 * 32
    model = build_model(cfg, device="meta")
    assert metrics.total_params(cfg) == sum(p.numel() for p in model.parameters())


def test_throughput_and_mfu():
    tok, tflops, mfu = metrics.throughput(
        tokens_per_iter=8 * 4096, seconds_per_iter=2.0, world_size=8, flops_token=1e10, peak=989.0
    )
    assert tok == pytest.approx(2048.0) and tflops == pytest.approx(20.48)
    assert mfu == pytest.approx(100 * 20.48 / 989.0)
    assert metrics.throughput(100, 1.0, 1, 1e9, None)[2] is None


def test_peaks():
    cpu = torch.device("cpu")
    assert metrics.device_peak_tflops(cpu) is None
    assert metrics.device_peak_tflops(cpu, override=2.5) == 2.5
    table = dict(metrics.PEAK_TFLOPS_BF16)
    assert table["H100"] == 989.0 and table["A100"] == 312.0 and table["MI250X"] == 191.5


def test_memory_cpu_is_positive():
    assert 0 < metrics.memory_gib(torch.device("cpu")) < 1024


def test_requested_missing_logger_fails_early():
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="'wandb' package"):
            check_backends(LoggingConfig(wandb_project="proj"))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="'tensorboard' package"):
            check_backends(LoggingConfig(tensorboard=True))
    check_backends(LoggingConfig())
    MetricWriters(LoggingConfig(), enabled=True).scalars({"x": 1.0, "y": None}, 1)  # no-op without backends

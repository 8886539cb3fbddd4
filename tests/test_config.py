"""Config tree: strict loading, override parsing, file errors, run checks, the pretrain CLI's error path."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import yaml

from megatron_lite.config import Config, ConfigError, load_config, main_argv_to_config
from megatron_lite.pretrain import main as pretrain_main
from megatron_lite.training.runtime import check_run_config

TINY = {
    "model": {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "max_position_embeddings": 64,
    },
    "data": {"mock": True, "seq_length": 32},
    "training": {"micro_batch_size": 2, "train_iters": 2},
}


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_and_file(tmp_path):
    cfg = load_config(write(tmp_path, TINY))
    assert cfg.model.hidden_size == 64 and cfg.model.head_dim == 16
    assert cfg.training.micro_batch_size == 2 and cfg.optimizer.lr == 3e-4


def test_unknown_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key model\.hiden_size"):
        load_config(write(tmp_path, {"model": {"hiden_size": 3}}))
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config(write(tmp_path, {"modle": {}}))
    with pytest.raises(ConfigError, match=r"unknown key training\.bogus"):
        load_config(None, ["--training.bogus", "1", "--data.mock", "true"])


@pytest.mark.parametrize(
    "override, field",
    [
        (["--model.hidden_size", "abc"], "model.hidden_size"),
        (["--model.hidden_size", "1.5"], "model.hidden_size"),
        (["--data.mock", "maybe"], "data.mock"),
        (["--optimizer.lr", "fast"], "optimizer.lr"),
        (["--training.precision", "fp8"], "training.precision"),
        (["--training.micro_batch_size", "0"], "training.micro_batch_size"),
        (["--logging.peak_tflops", "-1"], "logging.peak_tflops"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["--data.mock", "true", *override])


def test_override_parsing():
    cfg = main_argv_to_config(
        [
            "--data.path",
            "0.7",
            "a",
            "0.3",
            "b",
            "--parallel.tensor",
            "2",
            "--training.global_batch_size=8",
            "--logging.tensorboard",
            "false",
            "--model.sliding_window",
            "none",
            "--training.micro-batch-size",
            "4",
        ]
    )
    assert cfg.data.path == ["0.7", "a", "0.3", "b"]
    assert cfg.parallel.tensor == 2 and cfg.training.global_batch_size == 8
    assert cfg.logging.tensorboard is False and cfg.model.sliding_window is None
    assert cfg.training.micro_batch_size == 4  # dashes read as underscores
    single = main_argv_to_config(["--data.path", "prefix"])
    assert single.data.path == ["prefix"]


def test_override_beats_file(tmp_path):
    path = write(tmp_path, TINY)
    cfg = main_argv_to_config(["--config", str(path), "--model.num_layers", "3"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config"], "--config needs a file path"),
        (["--config", "/nonexistent/x.yaml"], "does not exist"),
        (["--data.mock"], "has no value"),
        (["stray"], "unexpected argument"),
        (["--nosection", "1"], "--section.field"),
    ],
)
def test_argv_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        main_argv_to_config(argv)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        load_config(None, ["--data.mock", "true", "--data.seq_length", "99999"])
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_config(None, [])


def test_run_checks_need_world_size():
    cfg = load_config(None, ["--data.mock", "true", "--training.micro_batch_size", "2"])
    assert check_run_config(cfg, 4) == 4 and cfg.training.global_batch_size == 8
    bad = load_config(
        None, ["--data.mock", "true", "--training.micro_batch_size", "2", "--training.global_batch_size", "6"]
    )
    with pytest.raises(ConfigError, match=r"global_batch_size \(6\) is not divisible"):
        check_run_config(bad, 2)
    pp = load_config(None, ["--data.mock", "true", "--parallel.pipeline", "2"])
    assert check_run_config(pp, 2) == 1  # pipelines are supported; the world must hold them
    with pytest.raises(ConfigError, match=r"world size \(3\) is not divisible .* parallel.pipeline \(2\)"):
        check_run_config(pp, 3)
    tp = load_config(None, ["--data.mock", "true", "--parallel.tensor", "3"])
    with pytest.raises(ConfigError, match="not divisible"):
        check_run_config(tp, 3)
    sel = load_config(None, ["--data.mock", "true", "--training.recompute", "selective"])
    assert check_run_config(sel, 1) == 1  # implemented: matmul/attention outputs kept, the rest recomputed
    with pytest.raises(ConfigError, match="training.recompute"):
        load_config(None, ["--data.mock", "true", "--training.recompute", "some"])
    if not torch.cuda.is_available():
        flex = load_config(None, ["--data.mock", "true", "--training.attention_backend", "flex"])
        with pytest.raises(ConfigError, match="attention_backend 'flex' needs a CUDA device"):
            check_run_config(flex, 1)
    sdpa = load_config(
        None,
        [
            "--data.mock",
            "true",
            "--training.attention_backend",
            "sdpa",
            "--data.reset_attention_mask",
            "true",
        ],
    )
    with pytest.raises(ConfigError, match="plain causal"):
        check_run_config(sdpa, 1)
    wb = load_config(None, ["--data.mock", "true", "--logging.wandb_project", "p"])
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="wandb"):
            check_run_config(wb, 1)


def test_save_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, TINY), ["--data.path", "0.5", "a", "0.5", "b"])
    cfg.save(tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_cli_config_error_is_one_line_exit_2(tmp_path, capsys):
    path = write(tmp_path, TINY)
    status = pretrain_main(
        [
            "--config",
            str(path),
            "--model.num_attention_heads",
            "5",
            "--logging.run_dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("config error: ") and err.count("\n") == 1, err
    assert "num_attention_heads" in err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()  # nothing written for a rejected config


def test_resolved_config_written(tmp_path, capsys):
    run = tmp_path / "run"
    status = pretrain_main(
        [
            "--config",
            str(write(tmp_path, TINY)),
            "--logging.run_dir",
            str(run),
            "--training.train_iters",
            "1",
            "--logging.log_interval",
            "1",
        ]
    )
    assert status == 0, capsys.readouterr().err
    saved = load_config(run / "config.yaml")
    assert saved.training.global_batch_size == 2  # resolved from micro_batch_size * dp
    assert isinstance(saved, Config) and saved.model.hidden_size == 64

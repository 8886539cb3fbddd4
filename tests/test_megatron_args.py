"""Megatron-LM launch lines and ``--help``: the resolved config, refusals, the help text.

Reference: the flags' meanings in Megatron-LM's ``megatron/training/arguments.py`` and the
launch line of its ``examples/mixtral/train_mixtral_8x7b_distributed.sh`` (sizes shrunk).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from dist_utils import free_port
from test_training_logging import TRAIN_RE

from megatron_lite.config import Config, ConfigError, main_argv_to_config
from megatron_lite.config_help import config_fields
from megatron_lite.pretrain import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]

# Megatron-LM examples/mixtral/train_mixtral_8x7b_distributed.sh, every argument group as written
# there but with tiny sizes (8x7B: 32 layers, hidden 4096, ffn 14336, 32 heads, 8 groups, 8 experts).
MIXTRAL_LINE = """
    --use-mcore-models --disable-bias-linear --seq-length 32 --max-position-embeddings 64
    --num-layers 2 --hidden-size 32 --ffn-hidden-size 48 --num-attention-heads 4
    --init-method-std 0.01 --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm
    --position-embedding-type rope --swiglu --untie-embeddings-and-output-weights
    --group-query-attention --num-query-groups 2 --no-masked-softmax-fusion --no-position-embedding
    --rotary-base 1000000
    --num-experts 4 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
    --overlap-param-gather --overlap-grad-reduce
    --tokenizer-type Llama2Tokenizer --tokenizer-model bundled --mock-data --split 99990,8,2
    --micro-batch-size 1 --global-batch-size 4 --lr 1e-4 --train-iters 2 --lr-decay-iters 320000
    --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 0.1 --lr-warmup-iters 1 --clip-grad 1.0
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 2
    --use-distributed-optimizer --sequence-parallel
    --log-interval 1 --save-interval 10000 --eval-interval 1000 --eval-iters 10
    --no-load-optim --no-load-rng
""".split()


def test_mixtral_launch_line_resolves(capsys):
    cfg = main_argv_to_config(MIXTRAL_LINE)
    m, p, d, o, t = cfg.model, cfg.parallel, cfg.data, cfg.optimizer, cfg.training
    assert (m.arch, m.num_layers, m.hidden_size, m.intermediate_size) == ("mixtral", 2, 32, 48)
    assert (m.num_attention_heads, m.num_kv_heads, m.num_experts, m.top_k) == (4, 2, 4, 2)
    assert (m.rope_theta, m.init_std, m.aux_loss_coeff, m.tie_embeddings) == (1e6, 0.01, 0.01, False)
    assert (m.max_position_embeddings, d.seq_length, d.mock, d.split) == (64, 32, True, "99990,8,2")
    assert (d.tokenizer_type, d.tokenizer_model) == ("Llama2Tokenizer", "bundled")
    assert (p.tensor, p.pipeline, p.expert, p.moe_dispatcher) == (1, 1, 2, "alltoall")
    assert p.distributed_optimizer and p.overlap_grad_reduce and not p.sequence_parallel  # tp 1: off
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_decay_iters, o.lr_warmup_iters) == (
        1e-4,
        1e-5,
        "cosine",
        320000,
        1,
    )
    assert (o.weight_decay, o.clip_grad) == (0.1, 1.0)
    assert (t.micro_batch_size, t.global_batch_size, t.train_iters, t.eval_interval, t.eval_iters) == (
        1,
        4,
        2,
        1000,
        10,
    )
    assert (t.save_interval, cfg.logging.log_interval) == (10000, 1)
    assert "accepted without effect" in capsys.readouterr().err


def test_dense_line_megatron_defaults_and_mixing():
    line = [
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--num-layers-per-virtual-pipeline-stage", "1", "--bf16", "--recompute-granularity", "full",
        "--data-path", "0.3", "a/x", "0.7", "b/y", "--save", "ck", "--load=ck", "--window-size", "(16, 0)",
        "--tensorboard-dir", "tb", "--seq-length", "32", "--max-position-embeddings", "64",
        "--training.seed", "7",  # our own overrides mix in
    ]  # fmt: skip
    cfg = main_argv_to_config(line)
    assert cfg.model.num_kv_heads == 4 and cfg.model.tie_embeddings  # Megatron: MHA and tied by default
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline) == (2, 2, 2)
    assert (
        cfg.parallel.sequence_parallel
        and cfg.training.precision == "bf16"
        and cfg.training.recompute == "full"
    )
    assert cfg.data.path == ["0.3", "a/x", "0.7", "b/y"] and cfg.model.sliding_window == 16
    assert (cfg.training.save, cfg.training.load, cfg.training.seed) == ("ck", "ck", 7)
    assert cfg.logging.tensorboard and cfg.logging.run_dir == "tb"


@pytest.mark.parametrize(
    "strategy, distributed, stage",
    [
        ("optim_grads_params", True, "parameters"),
        ("optim_grads", True, "gradients"),
        ("optim", True, "optimizer"),
        ("no_shard", False, "optimizer"),
    ],
)
def test_megatron_fsdp_sharding_strategy(strategy, distributed, stage, capsys):
    """Megatron-FSDP's line (ZeRO-3 example) maps onto our sharding stages; --use-megatron-fsdp is noted."""
    line = ["--mock-data", "--pipeline-model-parallel-size", "2", "--num-layers", "4", "--use-megatron-fsdp"]
    line += ["--data-parallel-sharding-strategy", strategy, "--untie-embeddings-and-output-weights"]
    cfg = main_argv_to_config(line)
    assert (cfg.parallel.distributed_optimizer, cfg.parallel.data_parallel_sharding) == (distributed, stage)
    assert "--use-megatron-fsdp" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fp8-format", "hybrid"], "unsupported argument --fp8-format"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm: megatron_lite supports only RMSNorm"),
        (["--hidden-dropout", "0.1"], "supports only 0.0"),
        (["--no-load-optim", "--load", "x"], "--no-load-optim with --load"),
        (
            [
                "--num-layers",
                "6",
                "--pipeline-model-parallel-size",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "2",
            ],
            "not divisible",
        ),  # fmt: skip
        (["--sequence-parallel", "1"], "takes no value"),
        (["--data-parallel-sharding-strategy", "full"], "must be one of no_shard, optim, optim_grads"),
    ],
)
def test_unsupported_is_refused_by_name(argv, message):
    with pytest.raises(ConfigError, match=message):
        main_argv_to_config(["--mock-data", *argv])


def test_refusal_is_one_line_exit_2(capsys):
    assert pretrain_main(["--mock-data", "--use-torch-fsdp2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: unsupported argument --use-torch-fsdp2") and err.count("\n") == 1


def test_help_anywhere_lists_every_field(capsys):
    assert pretrain_main(["--parallel.tensor", "2", "--help", "--bogus"]) == 0
    text = capsys.readouterr().out
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(hints[section.name]):
            assert f"--{section.name}.{f.name} " in text
    assert all(meaning for *_, meaning in config_fields()), [r[0] for r in config_fields() if not r[3]]
    assert "--model.num_kv_heads" in text and "int = 8" in text and "key/value heads" in text
    assert "--tensor-model-parallel-size" in text and "-> --parallel.tensor" in text


@pytest.mark.slow
def test_mixtral_launch_line_trains_expert_parallel(tmp_path):
    """The launch line itself runs under torchrun: 2 processes, expert parallel 2, ZeRO-1."""
    pytest.importorskip("mistral_common")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    argv = [*launcher, "--master-port", str(free_port()), "-m", "megatron_lite.pretrain", *MIXTRAL_LINE]
    argv += ["--logging.run_dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    its = [int(m["it"]) for m in TRAIN_RE.finditer(done.stdout)]
    assert its == [1, 2], done.stdout[-2000:]  # --log-interval 1 from the line

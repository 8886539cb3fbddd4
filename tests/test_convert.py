"""Checkpoint conversion: HF <-> training checkpoints of any (tp, pp, ep) layout, initial weights.

References: transformers' own logits for HF round trips; the one-process run for checkpoints
written by a tensor-parallel run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from dist_utils import run_distributed
from test_training_parallel import _trainer

from megatron_lite.config import ModelConfig
from megatron_lite.inference import load_model_for_inference
from megatron_lite.models import build_model, save_hf
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.convert import read_full_state

REPO = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


def _convert(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools/convert_checkpoint.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def _tiny_hf(path: Path, **overrides) -> ModelConfig:
    fields = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=4, num_experts=8)
    cfg = tiny_model_config(**{**fields, **overrides})
    save_hf(build_model(cfg, "cpu", dtype=torch.float32, seed=3), path)
    return cfg


@pytest.mark.parametrize(
    "arch,layout,overrides",
    [
        ("mistral", ["--tensor", "4"], {"num_kv_heads": 1}),  # KV heads replicated over tp
        ("mistral", ["--tensor", "2", "--pipeline", "2"], {"tie_embeddings": True}),
        ("mixtral", ["--tensor", "2", "--expert", "2"], {"num_experts": 4}),
        ("mixtral", ["--pipeline", "2", "--virtual-pipeline", "2", "--expert", "4"], {"num_experts": 4}),
    ],
)
def test_hf_to_layout_and_back(tmp_path, arch, layout, overrides):
    """HF -> sharded training checkpoint -> HF gives transformers the same logits."""
    _tiny_hf(tmp_path / "hf", arch=arch, **overrides)
    done = _convert(
        "--input", tmp_path / "hf", "--output", tmp_path / "ckpt", "--to", "megatron_lite", *layout
    )
    assert done.returncode == 0, done.stderr
    assert "wrote model-only training checkpoint" in done.stdout
    shards = sorted(p.name for p in (tmp_path / "ckpt/iter_0000000").glob("mp_rank_*"))
    expected = 1
    for flag in ("--tensor", "--pipeline", "--expert"):
        expected *= int(layout[layout.index(flag) + 1]) if flag in layout else 1
    assert len(shards) == expected, shards
    back = _convert(
        "--input", tmp_path / "ckpt", "--output", tmp_path / "hf2", "--to", "hf", "--dtype", "fp32"
    )
    assert back.returncode == 0, back.stderr
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_hf_logits(tmp_path / "hf2", tokens), _hf_logits(tmp_path / "hf", tokens))
    model = load_model_for_inference(tmp_path / "ckpt")  # generation reads training checkpoints too
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, _hf_logits(tmp_path / "hf", tokens), atol=1e-4, rtol=1e-4)


def test_bad_inputs(tmp_path):
    missing = _convert("--input", tmp_path / "nope", "--output", tmp_path / "o", "--to", "hf")
    assert missing.returncode == 1 and "not a directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = _convert("--input", tmp_path / "empty", "--output", tmp_path / "o", "--to", "hf")
    assert empty.returncode == 1 and "latest_checkpointed_iteration.txt" in empty.stderr
    _tiny_hf(tmp_path / "hf")
    bad = _convert(
        "--input", tmp_path / "hf", "--output", tmp_path / "o", "--to", "megatron_lite", "--tensor", "3"
    )
    assert bad.returncode == 1 and "3" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("latest*"))
    with pytest.raises(CheckpointError, match="no shard file holds|missing"):
        done = _convert("--input", tmp_path / "hf", "--output", tmp_path / "c", "--to", "megatron_lite")
        assert done.returncode == 0
        for shard in (tmp_path / "c/iter_0000000").glob("mp_rank_*/*.pt"):
            shard.unlink()
        read_full_state(tmp_path / "c")


# ---------------------------------------------------------------- checkpoints of a parallel run

HF_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2
)
TP2 = ["--parallel.tensor", "2", "--parallel.sequence_parallel", "true"]
PP2 = ["--parallel.pipeline", "2", "--training.train_iters", "2"]


def _run(overrides: list[str], world_size: int) -> list[float]:
    trainer = _trainer(overrides, world_size)
    losses = [r.loss for r in trainer.train()]
    trainer.runtime.dims.destroy_groups()
    return losses


def _parallel_body(rank: int, world_size: int, root: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    _run([*TP2, "--training.train_iters", "2", "--training.save", f"{root}/tp2"], world_size)
    _run([*PP2, "--training.save", f"{root}/pp2"], world_size)
    losses = _run([*TP2, "--training.train_iters", "2", "--training.initial_load", f"{root}/hf"], world_size)
    torch.save(losses, f"{root}/initial_tp2_rank{rank}.pt")
    losses = _run([*PP2, "--training.initial_load", f"{root}/hf"], world_size)  # each stage its layers
    torch.save(losses, f"{root}/initial_pp2_rank{rank}.pt")


@pytest.mark.slow
def test_tensor_parallel_checkpoint_and_initial_load(tmp_path):
    """tp=2 and pp=2 runs' sharded checkpoints reassemble to the one-process run's weights; tp=2,
    pp=2 and one process start identically from an HF directory given as training.initial_load."""
    save_hf(build_model(tiny_model_config(**HF_TINY, num_experts=8), "cpu", seed=5), tmp_path / "hf")
    _run(["--training.train_iters", "2", "--training.save", str(tmp_path / "tp1")], 1)
    reference = _run(["--training.train_iters", "2", "--training.initial_load", str(tmp_path / "hf")], 1)
    run_distributed(_parallel_body, 2, str(tmp_path))
    _, one = read_full_state(tmp_path / "tp1")
    for layout in ("tp2", "pp2"):
        _, two = read_full_state(tmp_path / layout)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=f"{layout} {name}")
    for rank in range(2):
        for layout in ("tp2", "pp2"):
            got = torch.load(tmp_path / f"initial_{layout}_rank{rank}.pt")
            assert got == pytest.approx(reference, rel=1e-5), layout
    # the HF start really was used: another seed's HF weights give another first loss
    assert reference != pytest.approx(_run(["--training.train_iters", "2"], 1), rel=1e-3)


def test_initial_load_rejects_other_shapes(tmp_path):
    cfg = tiny_model_config(**{**HF_TINY, "hidden_size": 32}, max_position_embeddings=32768, num_experts=8)
    save_hf(build_model(cfg, "cpu", seed=5), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="hidden_size is 32 there but 64"):
        _trainer(["--training.initial_load", str(tmp_path / "hf")], 1)


ZERO1 = ["--parallel.distributed_optimizer", "true", "--parallel.grad_bucket_mb", "0.05"]


def _zero1_source(rank: int, world_size: int, root: str) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    _run(
        [*ZERO1, "--training.train_iters", "4", "--training.save", root, "--training.exit_interval", "2"],
        world_size,
    )


def _resume_body(rank: int, world_size: int, root: str, layouts: dict[str, list[str]]) -> None:
    os.environ["WORLD_SIZE"] = str(world_size)
    for name, overrides in layouts.items():
        losses = _run(
            [*overrides, "--training.train_iters", "4", "--training.load", f"{root}/{name}"], world_size
        )
        torch.save(losses, f"{root}/resumed_{name}_rank{rank}.pt")


@pytest.mark.slow
def test_with_optimizer_training_continues_in_another_layout(tmp_path):
    """Checkpoints at iteration 2, resharded with their AdamW states, continue with the losses of
    the uninterrupted one-process run: a one-process checkpoint to tp=2 (+SP) and to pp=2, and a
    ZeRO-1 checkpoint of two data-parallel ranks to tp=2."""
    expected = _run(["--training.train_iters", "4"], 1)
    src, src_zero1 = str(tmp_path / "src"), str(tmp_path / "src_zero1")
    _run(["--training.train_iters", "4", "--training.save", src, "--training.exit_interval", "2"], 1)
    run_distributed(_zero1_source, 2, src_zero1)
    targets = {
        "tp2": (src, TP2, ["--tensor", "2"]),
        "pp2": (src, ["--parallel.pipeline", "2"], ["--pipeline", "2"]),
        "tp2_from_zero1": (src_zero1, TP2, ["--tensor", "2"]),
    }
    for name, (source, _, flags) in targets.items():
        done = _convert(
            "--input",
            source,
            "--output",
            tmp_path / name,
            "--to",
            "megatron_lite",
            *flags,
            "--with-optimizer",
        )
        assert done.returncode == 0, done.stderr
        assert "iteration 2" in done.stdout and (tmp_path / name / "iter_0000002").is_dir()
    run_distributed(_resume_body, 2, str(tmp_path), {name: run for name, (_, run, _) in targets.items()})
    for name in targets:
        for rank in range(2):
            got = torch.load(tmp_path / f"resumed_{name}_rank{rank}.pt")
            assert got == pytest.approx(expected[2:], rel=1e-5), name
    weights_only = _convert("--input", tmp_path / "tp2", "--output", tmp_path / "w", "--to", "megatron_lite")
    assert weights_only.returncode == 0, weights_only.stderr
    refused = _convert(
        "--input", tmp_path / "w", "--output", tmp_path / "x", "--to", "megatron_lite", "--with-optimizer"
    )
    assert refused.returncode == 1 and "no optimizer state" in refused.stderr

"""training.objective: config checks, sft's loss-mask requirement, preference data, the DPO loss.

The DPO loss and its gradients are compared with a direct, per-pair implementation of the
paper's formula (log_softmax + gather, ``-log(sigmoid(.))``) on a tiny model, the reference
log-probs coming from the run's own reference pass.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from objectives_common import dpo_args, make_word_tokenizer, preprocess_pairs
from tiny import TINY_MODEL

from megatron_lite.config import ConfigError, load_config
from megatron_lite.data.batching import collate_samples, make_batch
from megatron_lite.data.indexed_dataset import DatasetError, IndexedDataset
from megatron_lite.data.preference import ref_logps_path
from megatron_lite.training.data import build_datasets
from megatron_lite.training.objectives import DPOObjective, dpo_loss
from megatron_lite.training.runtime import check_run_config, init_runtime
from megatron_lite.training.setup import setup_training
from megatron_lite.training.trainer import forward_backward


def _cfg(args):
    cfg = load_config(None, args)
    check_run_config(cfg, 1)
    return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.objective", "rlhf"], "training.objective ('rlhf') must be one of"),
        (["--training.dpo_beta", "0"], "training.dpo_beta (0.0) must be a positive number"),
        (["--training.objective", "sft", "--data.mock", "true"], "sft needs data with loss masks"),
        (["--training.objective", "dpo", "--data.mock", "true"], "dpo needs data with loss masks"),
    ],
)
def test_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [*TINY_MODEL, "--data.path", "x", "--data.seq_length", "16", *overrides])


def test_sft_refuses_data_without_loss_masks(tmp_path):
    from data_common import write_dataset

    tok = make_word_tokenizer(tmp_path / "tok")
    prefix = write_dataset(tmp_path / "plain_text_document", [np.arange(5, 40)] * 8)
    args = [*TINY_MODEL, "--data.path", prefix, "--data.tokenizer_type", "HuggingFaceTokenizer"]
    args += ["--data.tokenizer_model", tok, "--data.seq_length", "16", "--training.train_iters", "1"]
    build_datasets(_cfg(args))  # pretrain reads it
    with pytest.raises(DatasetError, match=r"plain_text_document: training.objective sft needs loss masks"):
        build_datasets(_cfg([*args, "--training.objective", "sft"]))


def test_preprocess_preference_pairs(tmp_path):
    prefix, _ = preprocess_pairs(tmp_path, n=5)
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix.replace("_document", "_loss_mask"))
    assert len(tokens) == 10
    records = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    for i, rec in enumerate(records):
        chosen, rejected = tokens.get(2 * i), tokens.get(2 * i + 1)
        mc, mr = masks.get(2 * i), masks.get(2 * i + 1)
        n_prompt = int(np.argmax(mc))  # the shared prompt: mask 0, same tokens
        assert n_prompt == int(np.argmax(mr)) > 0
        assert np.array_equal(chosen[:n_prompt], rejected[:n_prompt])
        # response words + EOD (2) under mask 1
        assert mc[n_prompt:].all() and mr[n_prompt:].all()
        assert len(chosen) - n_prompt == len(rec["chosen"].split()) + 1 and chosen[-1] == 2
        assert len(rejected) - n_prompt == len(rec["rejected"].split()) + 1


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"prompt": "w1", "chosen": "w2"},
            "preference record needs string 'prompt', 'chosen' and 'rejected' (field 'rejected' is NoneType)",
        ),
        (
            {"prompt": "w1", "chosen": "w2", "rejected": "  "},
            "preference record has an empty 'rejected' response",
        ),
        ({"prompt": "w1", "chosen": "w2", "rejected": "w2"}, "'chosen' and 'rejected' are the same text"),
    ],
)
def test_preprocess_preference_bad_record(tmp_path, capsys, record, message):
    import preprocess_data

    tok = make_word_tokenizer(tmp_path / "tok")
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "o"), "--preference"]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok]
    assert preprocess_data.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"bad.jsonl:1: {message}"), err


def test_batches_keep_pairs_together(tmp_path):
    prefix, tok = preprocess_pairs(tmp_path, n=8)
    cfg = _cfg(dpo_args(prefix, tok))
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    ds = trainer.train_stream.dataset
    ref = np.load(ref_logps_path(prefix))["logps"]
    assert ref.shape == (8, 2) and (ref < 0).all()
    batch = trainer.train_stream.next()[0]
    assert batch.tokens.shape == (4, 24)  # 2 pairs -> rows 2i (chosen), 2i + 1 (rejected)
    for i, p in enumerate(ds.order[:2]):
        pair = ds.pair(p)
        assert torch.equal(batch.tokens[2 * i : 2 * i + 2], torch.from_numpy(pair["tokens"][:, :-1]))
        assert torch.equal(batch.ref_logps[2 * i : 2 * i + 2], torch.from_numpy(ref[p]))


def _direct_dpo_loss(model, batch, ref, beta: float) -> torch.Tensor:
    """The paper's formula, pair by pair, from full-vocabulary log-softmax."""
    logits = model(batch.tokens, position_ids=batch.position_ids).float()  # [2P, s, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)  # [2P, s]
    seq = (logp * batch.loss_mask).sum(dim=-1)  # [2P]
    pairs = batch.tokens.shape[0] // 2
    total = 0.0
    for i in range(pairs):
        h = beta * ((seq[2 * i] - ref[2 * i]) - (seq[2 * i + 1] - ref[2 * i + 1]))
        total = total - torch.log(torch.sigmoid(h))
    return total / pairs


def test_dpo_loss_and_gradients_match_the_paper(tmp_path):
    prefix, tok = preprocess_pairs(tmp_path, n=8)
    cfg = _cfg(dpo_args(prefix, tok))
    trainer = setup_training(cfg, init_runtime(cfg), log=lambda _: None)
    model, objective = trainer.model, DPOObjective(cfg)
    micro = trainer.train_stream.next()  # 2 microbatches of 2 pairs
    # move the policy away from the reference so the loss is not log 2 everywhere
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    objective.start_step(torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    sums = forward_backward(model, micro, trainer.runtime, loss_weight=1 / 4, objective=objective)
    ours = [p.grad.clone() for p in model.parameters()]
    metrics = objective.finish_step(trainer.runtime, 4.0)

    whole = collate_samples([trainer.train_stream.dataset[i] for i in range(4)])
    big = make_batch(whole["tokens"], 2, False, False, False, whole["loss_mask"])
    model.zero_grad(set_to_none=True)
    direct = _direct_dpo_loss(model, big, whole["ref_logps"], 0.5)
    direct.backward()
    assert float(sums[0]) / 4 == pytest.approx(float(direct.detach()), rel=1e-5)
    assert abs(float(direct.detach()) - math.log(2)) > 1e-3
    for a, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"}
    assert metrics["rewards/margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])


def test_dpo_loss_values():
    policy = torch.tensor([-3.0, -5.0, -2.0, -1.0])
    ref = torch.tensor([-4.0, -4.0, -2.0, -2.0])
    losses, chosen, rejected = dpo_loss(policy, ref, 0.1)
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.1]))
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([0.2, -0.1])))


def test_dpo_run_logs_rewards_and_starts_at_log2(tmp_path):
    prefix, tok = preprocess_pairs(tmp_path, n=8)
    cfg = _cfg([*dpo_args(prefix, tok), "--logging.log_interval", "1", "--training.eval_interval", "3"])
    lines = []
    trainer = setup_training(cfg, init_runtime(cfg), log=lines.append)
    results = trainer.train()
    assert results[0].loss == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert results[-1].loss < results[0].loss
    train_lines = [line for line in lines if "rewards/accuracy" in line]
    assert len(train_lines) == 3 and "rewards/chosen" in train_lines[0] and "rewards/margin" in train_lines[0]
    assert "| dpo loss: 6.931472E-01 |" in train_lines[0]
    assert any(
        "validation loss at iteration 3 | dpo loss value:" in line and "PPL" not in line for line in lines
    ), lines
    # a second run reads the sidecar instead of scoring again
    lines2 = []
    setup_training(cfg, init_runtime(cfg), log=lines2.append)
    assert any("reference log-probs from" in line for line in lines2)


def test_sft_trains_on_the_response_masks(tmp_path):
    import preprocess_data
    from objectives_common import preference_records

    tok = make_word_tokenizer(tmp_path / "tok")
    records = [{"prompt": r["prompt"], "response": r["chosen"]} for r in preference_records(16)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--input", str(tmp_path / "sft.jsonl"), "--output-prefix", str(tmp_path / "sft"), "--instruction"]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok, "--log-interval", "0"]
    assert preprocess_data.main(argv) == 0
    args = [*TINY_MODEL, "--data.path", str(tmp_path / "sft_text_document"), "--data.seq_length", "16"]
    args += ["--data.tokenizer_type", "HuggingFaceTokenizer", "--data.tokenizer_model", tok]
    args += ["--training.train_iters", "2", "--training.micro_batch_size", "2", "--data.split", "100,0,0"]
    runs = {}
    for objective in ("pretrain", "sft"):
        cfg = _cfg([*args, "--training.objective", objective])
        runs[objective] = setup_training(cfg, init_runtime(cfg), log=lambda _: None).train()
    assert [(r.loss, r.num_tokens) for r in runs["sft"]] == [(r.loss, r.num_tokens) for r in runs["pretrain"]]
    assert 0 < runs["sft"][0].num_tokens < 2 * 16  # prompts are masked out of the loss


def test_resume_without_the_reference_sidecar_fails(tmp_path):
    prefix, tok = preprocess_pairs(tmp_path, n=8)
    args = [
        *dpo_args(prefix, tok),
        "--training.save",
        str(tmp_path / "ckpt"),
        "--training.exit_interval",
        "1",
    ]
    cfg = _cfg(args)
    setup_training(cfg, init_runtime(cfg), log=lambda _: None).train()
    os.remove(ref_logps_path(prefix))
    cfg = _cfg([*args, "--training.load", str(tmp_path / "ckpt")])
    with pytest.raises(DatasetError, match=r"prefs_text_ref_logps.npz is missing and the run resumes"):
        setup_training(cfg, init_runtime(cfg), log=lambda _: None)

"""Instruction data: loss masks, FFD packing, instruction-augmented texts and mixing."""

from __future__ import annotations

import random

import numpy as np
import pytest
from data_common import mistral, mistral_args, random_text, run_cli, write_jsonl

from megatron_lite.data import build_gpt_datasets
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.instruction import (
    augment_text,
    interleave,
    pack_examples,
    parse_messages,
    tokenize_conversation,
)


def sft_records(n=60, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append({"prompt": random_text(rng, 2, 30), "response": random_text(rng, 1, 40)})
        else:
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": random_text(rng, 2, 10)},
                        {"role": "assistant", "content": random_text(rng, 1, 10)},
                        {"role": "user", "content": random_text(rng, 2, 10)},
                        {"role": "assistant", "content": random_text(rng, 1, 10)},
                    ]
                }
            )
    return out


def test_conversation_tokens_and_mask():
    tok = mistral()
    turns = parse_messages({"prompt": "What is 2+2?", "response": "Four."}, "f:1")
    tokens, mask = tokenize_conversation(tok, turns)
    answer = tok.encode_raw("Four.") + [tok.eod]
    assert tokens[0] == tok.bos and tokens[-1] == tok.eod
    assert tokens[mask == 1].tolist() == answer  # only the response (and its EOD) is trained on
    assert tok.detokenize(tokens[mask == 0]) == "[INST] What is 2+2? [/INST]"
    two = parse_messages(sft_records(1)[0], "f:1")
    tokens, mask = tokenize_conversation(tok, two)
    assert (tokens == tok.eod).sum() == 2 and mask[tokens == tok.eod].tolist() == [1, 1]
    assert "Be brief." in tok.detokenize(tokens[mask == 0])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "f:3: conversation must end with an assistant"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "f:3: messages\\[0\\] needs role"),
        ({"question": "q"}, "f:3: instruction record needs 'messages' or 'prompt'\\+'response'"),
        ({"prompt": 1, "response": "r"}, "f:3: 'prompt' and 'response' must be strings"),
    ],
)
def test_bad_records_name_file_and_line(record, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(mistral(), parse_messages(record, "f:3"), "f:3")


def test_pack_examples_keeps_examples_whole():
    rng = np.random.default_rng(0)
    examples = [
        (np.arange(n, dtype=np.int32) + 100 * i, np.ones(n, np.uint8))
        for i, n in enumerate(rng.integers(1, 33, 80))
    ]
    rows = list(pack_examples(examples, 32, pad_id=-1))
    assert all(t.shape == (32,) and m.shape == (32,) for t, m in rows)
    total = sum(len(t) for t, _ in examples)
    assert len(rows) <= np.ceil(total / 32) * 11 / 9 + 1  # FFD is near-optimal
    found = []
    for tokens, mask in rows:
        real = tokens[tokens >= 0]
        assert (mask[tokens < 0] == 0).all() and (tokens[len(real) :] == -1).all()  # padding at the end
        for block in np.split(real, np.flatnonzero(np.diff(real) != 1) + 1):
            found.append(block[0] // 100)
            np.testing.assert_array_equal(block, examples[block[0] // 100][0])
    assert sorted(found) == list(range(80))


def test_interleave_ratio_and_restart():
    out = list(interleave(range(300), lambda: iter("abc"), 0.25))
    mixed = [x for s, x in out if s]
    assert len(out) == 400 and len(mixed) == 100 and mixed[:4] == ["a", "b", "c", "a"]
    assert [x for s, x in out if not s] == list(range(300))


def test_augmented_template():
    text = augment_text(
        {
            "text": "Raw passage.",
            "instruction_pairs": [{"prompt": "Q1?", "response": "A1."}, {"question": "Q2?", "answer": "A2."}],
        },
        "f:1",
    )
    assert text == "Raw passage.\n\nQuestion: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: A2."


def test_preprocess_instruction_loss_mask_dataset(tmp_path, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records(40))
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "sft", "--instruction"))
    assert rc == 0, err
    tokens = IndexedDataset(str(tmp_path / "sft_text_document"))
    masks = IndexedDataset(str(tmp_path / "sft_text_loss_mask"))
    assert masks.dtype == np.uint8 and len(tokens) == len(masks) == 40
    np.testing.assert_array_equal(tokens.sequence_lengths, masks.sequence_lengths)
    tok = mistral()
    want = tokenize_conversation(tok, parse_messages(sft_records(40)[7], "x"))
    np.testing.assert_array_equal(tokens[7], want[0])
    np.testing.assert_array_equal(masks[7], want[1])


def test_packed_instruction_samples_never_cross_examples(tmp_path, capsys):
    from megatron_lite.data.batching import collate_samples, make_batch

    seq = 128
    path = write_jsonl(tmp_path / "sft.jsonl", sft_records(150))
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "p", "--instruction", "--pack-seq-length", seq))
    assert rc == 0 and "packed_rows=" in err, err
    tok = mistral()
    train, _, _ = build_gpt_datasets(
        [str(tmp_path / "p_text_document")], "1,0,0", seq, (64, 0, 0), 1, str(tmp_path / "cache")
    )
    items = [train[i] for i in range(16)]
    batch_in = collate_samples(items)
    batch = make_batch(batch_in["tokens"], tok.eod, True, True, True, batch_in["loss_mask"])
    flat = batch.tokens.reshape(-1)
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == flat.numel()
    assert all(r * seq in cu for r in range(17))  # rows never share a segment
    eods = (flat == tok.eod).nonzero().flatten().tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        inner = [p for p in eods if a <= p < b - 1]
        assert not inner, f"segment [{a}, {b}) attends across EOD at {inner}"
    for p in eods:  # every EOD closes its segment
        assert p + 1 in cu
    for row in range(16):  # each sample is exactly one packed row: it starts a new example with BOS
        assert batch.tokens[row, 0] == tok.bos and batch.position_ids[row, 0] == 0
    # the loss is only on response tokens: their labels are unmasked, prompt labels are not
    trained = batch.labels[batch.loss_mask.bool()]
    assert tok.bos not in trained.tolist() and (batch.loss_mask.sum() > 0)


def test_augmented_mixed_with_general_instructions(tmp_path, capsys):
    rng = random.Random(3)
    aug = [
        {"text": random_text(rng), "instruction_pairs": [{"prompt": "Why?", "response": "Because."}]}
        for _ in range(90)
    ]
    a = write_jsonl(tmp_path / "aug.jsonl", aug)
    g = write_jsonl(tmp_path / "gen.jsonl", sft_records(10))
    rc, err = run_cli(
        capsys,
        mistral_args(a, tmp_path / "m", "--instruction-augmented", "--mix-input", g, "--mix-ratio", "0.25"),
    )
    assert rc == 0, err
    assert "mixed_in=30" in err and "mix_restarts=2" in err
    tokens = IndexedDataset(str(tmp_path / "m_text_document"))
    masks = IndexedDataset(str(tmp_path / "m_text_loss_mask"))
    assert len(tokens) == 120
    tok = mistral()
    kinds = ["Question: Why?\nAnswer: Because." in tok.detokenize(t) for t in tokens]
    assert sum(kinds) == 90
    first_aug = kinds.index(True)
    assert masks[first_aug][1:].min() == 1  # augmented texts: loss on every token after BOS

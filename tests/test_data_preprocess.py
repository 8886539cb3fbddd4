"""tools/preprocess_data.py end to end: outputs, errors with file:line, cleaning, atomicity."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_common import REPO, mistral, mistral_args, random_text, run_cli, write_jsonl
from test_data_tokenizers import make_hf_tokenizer

from megatron_lite.data.indexed_dataset import IndexedDataset


def corpus(n=200, seed=0):
    rng = random.Random(seed)
    return [{"text": random_text(rng), "title": f"doc {i}"} for i in range(n)]


def final_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".idx")))


def test_round_trip_with_eod_gz_and_glob(tmp_path, capsys):
    docs = corpus(120)
    write_jsonl(tmp_path / "part1.jsonl", docs[:70])
    write_jsonl(tmp_path / "part2.jsonl.gz", docs[70:], gz=True)
    prefix = tmp_path / "out"
    rc, err = run_cli(
        capsys, mistral_args(str(tmp_path / "part*"), prefix, "--append-eod", "--json-keys", "text", "title")
    )
    assert rc == 0, err
    tok = mistral()
    for key in ("text", "title"):
        ds = IndexedDataset(f"{prefix}_{key}_document")
        assert ds.dtype == np.uint16 and len(ds) == 120
        for i in (0, 69, 70, 119):
            assert ds[i][-1] == tok.eod and ds[i][0] == tok.bos
            assert tok.detokenize(ds[i]) == docs[i][key]
    assert "docs/s" in err and "tokens/s" in err and "MB/s" in err


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--partitions", "3", "--workers", "2"]])
def test_workers_and_partitions_give_identical_bytes(tmp_path, capsys, extra):
    path = write_jsonl(tmp_path / "c.jsonl", corpus(300))
    assert run_cli(capsys, mistral_args(path, tmp_path / "one", "--append-eod"))[0] == 0
    assert run_cli(capsys, mistral_args(path, tmp_path / "many", "--append-eod", *extra))[0] == 0
    for ext in (".bin", ".idx"):
        one = open(f"{tmp_path}/one_text_document{ext}", "rb").read()
        assert one == open(f"{tmp_path}/many_text_document{ext}", "rb").read()
    assert final_files(tmp_path) == [
        "many_text_document.bin",
        "many_text_document.idx",
        "one_text_document.bin",
        "one_text_document.idx",
    ]


def test_malformed_line_stop_and_skip(tmp_path, capsys):
    records = corpus(10)
    records[3] = '{"text": "broken'
    records[6] = {"body": "no text key"}
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "o"))
    assert rc == 1 and f"{path}:4: malformed JSON" in err
    assert final_files(tmp_path) == []
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "o", "--on-error", "skip"))
    assert rc == 0
    assert f"{path}:4: malformed JSON" in err and f"{path}:7: missing key 'text'" in err
    assert "errors=2" in err
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 8


def test_wrong_type_names_key_and_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": 42}])
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "o"))
    assert rc == 1 and f"{path}:2: key 'text' is int, expected a string" in err


def test_empty_documents_are_dropped_and_counted(tmp_path, capsys):
    texts = ["a b c", "", "   ", "d"]
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": t} for t in texts])
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "o", "--append-eod"))
    assert rc == 0 and "empty=2" in err
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 2


def test_cleaning_counts(tmp_path, capsys):
    rng = random.Random(1)
    base = [random_text(rng, 80, 120) for _ in range(30)]
    near = [b.rsplit(" ", 2)[0] + " changed ending" for b in base[:5]]  # ~97% similar
    records = [{"text": t} for t in base + base[:4] + near]
    records += [{"text": "x"}, {"text": "#$%& *!@# ^&*( )(*&"}, {"text": " ".join(["spam eggs ham"] * 40)}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    rc, err = run_cli(
        capsys,
        mistral_args(
            path,
            tmp_path / "o",
            "--dedup-exact",
            "--dedup-minhash",
            "--minhash-threshold",
            "0.8",
            "--min-chars",
            "3",
            "--max-symbol-ratio",
            "0.5",
            "--max-repetition-ratio",
            "0.5",
        ),
    )
    assert rc == 0, err
    for count in ("dup_exact=4", "dup_minhash=5", "min_chars=1", "max_symbol_ratio=1"):
        assert count in err
    assert "max_repetition_ratio=1" in err
    assert len(IndexedDataset(str(tmp_path / "o_text_document"))) == 30


def test_large_vocabulary_uses_int32(tmp_path, capsys):
    tok_dir = make_hf_tokenizer(tmp_path / "hf", 70000)
    path = write_jsonl(tmp_path / "v.jsonl", [{"text": "w0 w69995 w12"}, {"text": "w65600"}])
    rc, err = run_cli(
        capsys,
        [
            "--input",
            path,
            "--output-prefix",
            tmp_path / "o",
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            tok_dir,
            "--append-eod",
        ],
    )
    assert rc == 0, err
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.dtype == np.int32
    assert ds[0].tolist() == [4, 69999, 16, 2] and ds[1].tolist() == [65604, 2]


def test_exception_midway_leaves_no_dataset(tmp_path, capsys):
    records = corpus(3000)
    records[2500] = "not json"
    path = write_jsonl(tmp_path / "c.jsonl", records)
    rc, err = run_cli(capsys, mistral_args(path, tmp_path / "o", "--workers", "2"))
    assert rc == 1 and f"{path}:2501" in err
    assert os.listdir(tmp_path) == ["c.jsonl"]  # no final names, no temporary files


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_dataset(tmp_path, sig):
    path = write_jsonl(tmp_path / "c.jsonl", corpus(20000))
    workers = "2" if sig == signal.SIGTERM else "1"
    args = mistral_args(path, tmp_path / "o", "--log-interval", 500, "--append-eod", "--workers", workers)
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until documents are being written
        line = proc.stderr.readline()
        if "processed" in line or not line:
            break
    proc.send_signal(sig)
    proc.wait(30)  # a hang here means a worker pool deadlocked on the signal
    assert proc.returncode != 0, "preprocessing finished before it could be interrupted"
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith((".bin", ".idx"))]
    if sig == signal.SIGTERM:  # a catchable signal also removes the temporary files
        assert names == ["c.jsonl"]

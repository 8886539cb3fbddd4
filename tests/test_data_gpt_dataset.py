"""GPTDataset / BlendedDataset / build_gpt_datasets / sampler: Megatron semantics, caching, ranks."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_common import write_dataset
from dist_utils import run_distributed

from megatron_lite.data import MegatronPretrainingSampler, build_gpt_datasets, gpt_dataset
from megatron_lite.data.gpt_dataset import GPTDataset, num_epochs_needed, parse_split, split_ranges


def tiny_docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 1000, rng.integers(0, 30)) for _ in range(n)]
    docs[0] = np.array([], dtype=np.int64)  # empty documents are allowed anywhere
    return docs


def expected_sample(ds: GPTDataset, docs, idx: int) -> np.ndarray:
    """Sample ``idx`` recomputed from the definition: tokens k*S .. (k+1)*S of the epoch stream."""
    stream = np.concatenate([docs[d] for d in ds.document_index])
    k = int(ds.shuffle_index[idx])
    return stream[k * ds.seq_length : (k + 1) * ds.seq_length + 1]


def test_samples_follow_megatron_definition(tmp_path):
    docs = tiny_docs()
    prefix = write_dataset(tmp_path / "d_text_document", docs)
    ds = GPTDataset(prefix, np.arange(len(docs)), 16, 200, seed=5, cache_dir=str(tmp_path / "c"))
    tokens = sum(len(d) for d in docs)
    epochs = num_epochs_needed(tokens, 16, 200)
    assert (epochs * tokens - 1) // 16 >= 200 > ((epochs - 1) * tokens - 1) // 16
    assert len(ds) == (epochs * tokens - 1) // 16 >= 200
    for idx in range(len(ds)):
        item = ds[idx]
        assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (17,)
        assert "loss_mask" not in item
        np.testing.assert_array_equal(item["tokens"], expected_sample(ds, docs, idx))
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_separate_final_epoch(tmp_path):
    docs = [np.arange(10) + 1 for _ in range(10)]  # 100 tokens per epoch -> 9 samples of 10+1
    prefix = write_dataset(tmp_path / "d", docs)
    ds = GPTDataset(prefix, np.arange(10), 10, 10, seed=1, cache_dir=None)  # needs a 2nd epoch, barely
    assert len(ds) == 19
    assert sorted(ds.shuffle_index[:9].tolist()) == list(range(9))  # first epoch shuffled apart
    assert sorted(ds.document_index[10:].tolist()) == list(range(10))


def test_split_parsing():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 4), (4, 7), (7, 10)]  # Megatron rounding
    assert split_ranges(parse_split("100,0,0"), 7) == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ValueError, match="'a,b'"):
        parse_split("a,b")


def test_cache_is_keyed_by_description_and_reused(tmp_path, monkeypatch):
    prefix = write_dataset(tmp_path / "d", tiny_docs())
    cache = tmp_path / "cache"
    first = build_gpt_datasets([prefix], "8,1,1", 8, (50, 5, 5), 3, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 3 * 4 and all(len(f.split("-")[0]) == 32 for f in files)  # md5 names
    monkeypatch.setattr(gpt_dataset, "build_indices", lambda *a: pytest.fail("rebuilt a cached index"))
    again = build_gpt_datasets([prefix], "8,1,1", 8, (50, 5, 5), 3, cache_dir=str(cache))
    for a, b in zip(first, again):
        assert isinstance(b.shuffle_index, np.memmap)
        np.testing.assert_array_equal(a[3]["tokens"], b[3]["tokens"])
    monkeypatch.undo()
    build_gpt_datasets([prefix], "8,1,1", 8, (50, 5, 5), 4, cache_dir=str(cache))  # new seed, new files
    assert len(os.listdir(cache)) == 2 * 3 * 4


def test_build_gpt_datasets_splits_and_none(tmp_path):
    prefix = write_dataset(tmp_path / "d", tiny_docs(100))
    train, valid, test = build_gpt_datasets([prefix], "90,10,0", 8, (100, 10, 10), 1, cache_dir=str(tmp_path))
    assert test is None and len(train) >= 100 and len(valid) >= 10
    assert set(train.documents.tolist()).isdisjoint(valid.documents.tolist())
    assert build_gpt_datasets([prefix], "90,10,0", 8, (100, 0, 0), 1, str(tmp_path))[1] is None


def test_blend_proportions_and_determinism(tmp_path):
    a = write_dataset(tmp_path / "a", [np.full(20, 5) for _ in range(50)])
    b = write_dataset(tmp_path / "b", [np.full(20, 6) for _ in range(50)])
    train, _, _ = build_gpt_datasets(["0.7", a, "0.3", b], "1,0,0", 16, (2000, 0, 0), 9, str(tmp_path / "c"))
    assert len(train) == 2000
    source = np.array([train[i]["tokens"][0] for i in range(2000)])
    assert abs((source == 5).mean() - 0.7) < 0.01 and abs((source == 6).mean() - 0.3) < 0.01
    again, _, _ = build_gpt_datasets(["0.7", a, "0.3", b], "1,0,0", 16, (2000, 0, 0), 9, None)
    for i in (0, 17, 1999):
        np.testing.assert_array_equal(train[i]["tokens"], again[i]["tokens"])
    with pytest.raises(ValueError, match="alternate weight and prefix"):
        build_gpt_datasets(["0.7", a, b], "1,0,0", 16, (10, 0, 0), 9, None)


def test_blend_with_one_instruction_dataset_adds_loss_masks(tmp_path):
    a = write_dataset(tmp_path / "a_text_document", [np.full(20, 5) for _ in range(20)])
    b = write_dataset(tmp_path / "b_text_document", [np.full(20, 6) for _ in range(20)])
    write_dataset(tmp_path / "b_text_loss_mask", [np.arange(20) % 2 for _ in range(20)], np.uint8)
    train, _, _ = build_gpt_datasets(["1", a, "1", b], "1,0,0", 8, (100, 0, 0), 0, str(tmp_path / "c"))
    for i in range(100):
        item = train[i]
        assert item["loss_mask"].dtype == np.float32 and item["loss_mask"].shape == (9,)
        if item["tokens"][0] == 5:
            assert item["loss_mask"].min() == 1.0
        else:
            assert set(item["loss_mask"].tolist()) == {0.0, 1.0}


def test_sampler_resume_and_ranks():
    def run(consumed, rank, dp=2):
        return list(MegatronPretrainingSampler(103, consumed, 4, rank, dp))

    full = [run(0, r) for r in range(2)]
    assert all(len(b) == 4 for b in full[0]) and len(full[0]) == 103 // 8
    seen = sorted(i for r in range(2) for batch in full[r] for i in batch)
    assert seen == list(range(96))
    assert run(24, 1) == full[1][3:]  # resume after 3 global batches
    tail = list(MegatronPretrainingSampler(103, 96, 4, 1, 2, drop_last=False))
    assert tail == [[100, 101, 102]]
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)


def _distributed_body(rank, world_size, prefix, cache):
    from megatron_lite.data import gpt_dataset as gd

    if rank != 0:  # only rank 0 may build; the others wait, then memory-map its files
        gd.build_indices = lambda *a: (_ for _ in ()).throw(AssertionError("rank != 0 built an index"))
    train, _, _ = build_gpt_datasets([prefix], "1,0,0", 8, (64, 0, 0), 11, cache_dir=cache)
    assert isinstance(train.sample_index, np.memmap)
    ref = np.load(os.path.join(cache, "expected.npy"))
    np.testing.assert_array_equal(np.stack([train[i]["tokens"] for i in range(8)]), ref)


@pytest.mark.slow
def test_rank0_builds_others_wait(tmp_path):
    prefix = write_dataset(tmp_path / "d", tiny_docs(80))
    expected, _, _ = build_gpt_datasets([prefix], "1,0,0", 8, (64, 0, 0), 11, cache_dir=None)
    cache = tmp_path / "shared_cache"
    cache.mkdir()
    np.save(cache / "expected.npy", np.stack([expected[i]["tokens"] for i in range(8)]))
    run_distributed(_distributed_body, 2, prefix, str(cache), timeout=120)
    assert len([f for f in os.listdir(cache) if f.endswith("description.json")]) == 1

"""Running a preprocessing job: partitions, worker pools, dedup state, atomic outputs."""

from __future__ import annotations

import os
import time
import traceback
import warnings

import numpy as np

from megatron_lite.data.cleaning import MinHashLSH, choose_bands_rows
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, concatenate_datasets, optimal_dtype
from megatron_lite.data.instruction import interleave, pack_examples
from megatron_lite.data.jsonl_input import WorkUnit, chunked, expand_inputs, iter_lines, plan_partitions
from megatron_lite.data.preprocess import (
    Encoder,
    PreprocessError,
    PreprocessOptions,
    Stats,
    encode_chunk,
    init_worker,
    log,
    pool_context,
)
from megatron_lite.data.tokenizers import build_tokenizer

MAX_ERRORS_SHOWN = 20


def output_prefixes(prefix: str, key: str) -> tuple[str, str]:
    """(token dataset, loss-mask dataset) prefixes for one JSON key."""
    return f"{prefix}_{key}_document", f"{prefix}_{key}_loss_mask"


class DatasetSink:
    """The datasets one partition writes (tokens, plus loss masks in instruction modes)."""

    def __init__(self, prefix: str, opts: PreprocessOptions, dtype, pad_id: int, stats: Stats):
        self.opts, self.pad_id, self.stats = opts, pad_id, stats
        self.tokens: dict[str, IndexedDatasetBuilder] = {}
        self.masks: dict[str, IndexedDatasetBuilder] = {}
        self.pending: list = []  # examples waiting to be packed
        try:
            for key in opts.json_keys:
                doc_prefix, mask_prefix = output_prefixes(prefix, key)
                self.tokens[key] = IndexedDatasetBuilder(doc_prefix, dtype)
                if opts.with_loss_mask:
                    self.masks[key] = IndexedDatasetBuilder(mask_prefix, np.uint8)
        except BaseException:
            self.abort()
            raise

    def _write(self, key: str, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        self.tokens[key].add_document(tokens)
        if key in self.masks:
            self.masks[key].add_document(mask)
        self.stats["tokens"] += len(tokens)

    def add(self, docs: dict) -> None:
        """Write (or queue for packing) one record's documents."""
        seq = self.opts.pack_seq_length
        for key, doc in docs.items():
            if isinstance(doc, list):  # a preference pair: chosen, rejected as sequences 2i, 2i + 1
                for tokens, mask in doc:
                    self._write(key, tokens, mask)
                continue
            tokens, mask = doc
            if seq is None:
                self._write(key, tokens, mask)
                continue
            if len(tokens) > seq:
                tokens, mask = tokens[:seq], mask[:seq]
                self.stats["truncated"] += 1
            self.pending.append((tokens, mask))
            if len(self.pending) >= self.opts.pack_buffer:
                self.flush()

    def flush(self) -> None:
        """Pack and write the queued instruction examples."""
        key = self.opts.json_keys[0]
        for tokens, mask in pack_examples(self.pending, self.opts.pack_seq_length, self.pad_id):
            self._write(key, tokens, mask)
            self.stats["packed_rows"] += 1
        self.pending = []

    def finalize(self) -> None:
        """Flush, then move every dataset to its final name."""
        if self.pending:
            self.flush()
        for builder in [*self.tokens.values(), *self.masks.values()]:
            builder.finalize()

    def abort(self) -> None:
        """Remove every temporary file."""
        for builder in [*self.tokens.values(), *self.masks.values()]:
            builder.abort()


class Deduplicator:
    """Exact (content hash) and near (MinHash LSH) duplicate detection over kept documents."""

    def __init__(self, opts: PreprocessOptions):
        self.hashes: set[bytes] | None = set() if opts.dedup_exact else None
        self.lsh = None
        if opts.dedup_minhash:
            bands, rows = opts.minhash_bands, opts.minhash_rows
            if bands is None or rows is None:
                bands, rows = choose_bands_rows(opts.minhash_threshold, opts.minhash_num_perm)
            if bands * rows > opts.minhash_num_perm:
                raise ValueError(
                    f"--minhash-bands * --minhash-rows ({bands}*{rows}) exceeds --minhash-num-perm"
                )
            self.lsh = MinHashLSH(opts.minhash_threshold, bands, rows)

    def check(self, payload: dict) -> str | None:
        """ "dup_exact"/"dup_minhash" for a duplicate, else None (and remember the document)."""
        if self.hashes is not None:
            if payload["hash"] in self.hashes:
                return "dup_exact"
            self.hashes.add(payload["hash"])
        if self.lsh is not None and self.lsh.is_duplicate_or_add(payload["sig"]):
            return "dup_minhash"
        return None


def _line_stream(units: list[WorkUnit], opts: PreprocessOptions, stats: Stats):
    lines = iter_lines(units, opts.mode)
    if not opts.mix_inputs:
        return lines
    mix_units = [WorkUnit(p) for p in expand_inputs(opts.mix_inputs, "--mix-input")]

    def reopen():
        stats["mix_restarts"] += 1
        return iter_lines(mix_units, "instruction")

    def mixed():
        for from_mix, line in interleave(lines, reopen, opts.mix_ratio):
            stats["mixed_in"] += int(from_mix)
            yield line

    stats["mix_restarts"] -= 1  # the first open is not a restart
    return mixed()


def _handle(result, sink: DatasetSink, dedup: Deduplicator, opts: PreprocessOptions, stats: Stats) -> None:
    status, where, payload = result
    stats["docs_in"] += 1
    if status == "error":
        stats["errors"] += 1
        if opts.on_error == "stop":
            raise PreprocessError(where)
        if stats["errors"] <= MAX_ERRORS_SHOWN:
            log(f"skipped {where}")
        return
    if status != "ok":
        stats[status] += 1
        return
    stats["bytes"] += payload["bytes"]
    dup = dedup.check(payload)
    if dup is not None:
        stats[dup] += 1
        return
    sink.add(payload["docs"])
    stats["docs_out"] += 1


def run_partition(
    units: list[WorkUnit], opts: PreprocessOptions, prefix: str, workers: int, tag: str = ""
) -> Stats:
    """Process work units into datasets at ``prefix`` (final names appear only on success)."""
    stats = Stats()
    tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model)
    dedup = Deduplicator(opts)
    # The pool is forked before any output file is open: workers must not inherit the temporary
    # files' descriptors (a file still open in a worker survives its removal on NFS-like mounts).
    pool = pool_context().Pool(workers, initializer=init_worker, initargs=(opts,)) if workers > 1 else None
    sink = None
    try:
        sink = DatasetSink(prefix, opts, optimal_dtype(tokenizer.vocab_size), tokenizer.pad, stats)
        chunks = chunked(_line_stream(units, opts, stats), opts.chunk_lines)
        start, next_log = time.time(), opts.log_interval
        if pool is not None:
            results = pool.imap(encode_chunk, chunks)
        else:
            encoder = Encoder(opts)
            results = map(encoder.encode_chunk, chunks)
        for chunk_results in results:
            for result in chunk_results:
                _handle(result, sink, dedup, opts, stats)
            if opts.log_interval > 0 and stats["docs_in"] >= next_log:
                next_log += opts.log_interval
                el = max(time.time() - start, 1e-9)
                log(
                    f"{tag}processed {stats['docs_in']} docs ({stats['docs_in'] / el:.0f} docs/s, "
                    f"{stats['tokens'] / el:.0f} tokens/s, {stats['bytes'] / el / 1e6:.2f} MB/s)"
                )
        sink.finalize()
        if pool is not None:
            pool.close()
    except BaseException:
        if pool is not None:  # stop the workers first, then remove what was written
            pool.terminate()
            pool.join()
            pool = None
        if sink is not None:
            sink.abort()
        raise
    finally:
        if pool is not None:
            pool.join()
    return stats


def _partition_main(k, units, opts, prefix, workers, queue) -> None:
    try:
        queue.put((k, run_partition(units, opts, prefix, workers, f"[partition {k}] "), None))
    except BaseException as exc:  # reported to the parent, which stops the run
        msg = str(exc) if isinstance(exc, PreprocessError) else traceback.format_exc()
        queue.put((k, None, msg))


def _merge_partitions(part_prefixes: list[str], opts: PreprocessOptions, dtype) -> None:
    keys = [(k, False) for k in opts.json_keys] + [(k, True) for k in opts.json_keys if opts.with_loss_mask]
    jobs = [
        (
            [output_prefixes(part, key)[int(is_mask)] for part in part_prefixes],
            output_prefixes(opts.output_prefix, key)[int(is_mask)],
            np.uint8 if is_mask else dtype,
        )
        for key, is_mask in keys
    ]
    concatenate_datasets(jobs)


def _remove_partitions(part_prefixes: list[str], opts: PreprocessOptions) -> None:
    for part in part_prefixes:
        for key in opts.json_keys:
            for pfx in output_prefixes(part, key):
                for ext in (".bin", ".idx"):
                    if os.path.exists(pfx + ext):
                        os.remove(pfx + ext)


def _run_partitions(groups, opts: PreprocessOptions, dtype) -> Stats:
    if opts.dedup_exact or opts.dedup_minhash:
        warnings.warn("with --partitions > 1 duplicates are removed within each partition only", stacklevel=2)
    part_prefixes = [f"{opts.output_prefix}.partition{k}.tmp-{os.getpid()}" for k in range(len(groups))]
    per_part = max(1, opts.workers // len(groups))
    ctx = pool_context()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_partition_main, args=(k, g, opts, part_prefixes[k], per_part, queue))
        for k, g in enumerate(groups)
    ]
    stats = Stats()
    try:
        for p in procs:
            p.start()
        for _ in procs:
            k, part_stats, error = queue.get()
            if error is not None:
                raise PreprocessError(f"partition {k} failed: {error}")
            stats.update(part_stats)
        for p in procs:
            p.join()
        _merge_partitions(part_prefixes, opts, dtype)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # the child's SIGTERM handler removes its temporary files
                p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        _remove_partitions(part_prefixes, opts)
    return stats


def run_preprocess(opts: PreprocessOptions) -> Stats:
    """Run a whole preprocessing job and print its summary to stderr."""
    opts.validate()
    files = expand_inputs(opts.inputs)
    if opts.mix_inputs:
        expand_inputs(opts.mix_inputs, "--mix-input")
    tokenizer = build_tokenizer(opts.tokenizer_type, opts.tokenizer_model)
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    log(
        f"preprocessing {len(files)} file(s) with {opts.workers} worker(s), {opts.partitions} partition(s); "
        f"vocab {tokenizer.vocab_size} -> {np.dtype(dtype).name} tokens"
    )
    start = time.time()
    groups = [g for g in plan_partitions(files, opts.partitions) if g]
    if len(groups) <= 1:
        stats = run_partition(groups[0] if groups else [], opts, opts.output_prefix, opts.workers)
    else:
        stats = _run_partitions(groups, opts, dtype)
    for line in stats.summary(time.time() - start):
        log(line)
    for key in opts.json_keys:
        for pfx in output_prefixes(opts.output_prefix, key)[: 1 + int(opts.with_loss_mask)]:
            log(f"wrote {pfx}.bin / {pfx}.idx")
    return stats

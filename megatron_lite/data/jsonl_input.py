"""JSONL input for preprocessing: globs, ``.jsonl.gz``, partitions by byte range, line numbers.

A work unit is a byte range of a plain file (lines *starting* in the range belong to it) or a
whole gzip file. Partitions are contiguous runs of units, so concatenating the partitions'
outputs in order reproduces a single sequential pass.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass

Line = tuple[str, int, bytes, str]  # (path, line number from 1, raw bytes, record kind)


@dataclass(frozen=True)
class WorkUnit:
    """Lines of ``path`` starting in ``[start, end)`` (``end`` None: to the end of the file)."""

    path: str
    start: int = 0
    end: int | None = None

    @property
    def size(self) -> int:
        """Bytes covered (compressed size for gzip files)."""
        end = os.path.getsize(self.path) if self.end is None else self.end
        return end - self.start


def expand_inputs(patterns: list[str], flag: str = "--input") -> list[str]:
    """Files matching each pattern (globs expanded, sorted, duplicates dropped, order kept)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{flag}: no file matches {pattern!r}")
        files += [m for m in matches if m not in files]
    return files


def _is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def plan_partitions(files: list[str], partitions: int) -> list[list[WorkUnit]]:
    """Split ``files`` into ``partitions`` contiguous groups of work units of similar byte size."""
    if partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {partitions}")
    units: list[WorkUnit] = []
    for path in files:
        size = os.path.getsize(path)
        if partitions == 1 or _is_gzip(path) or size == 0:
            units.append(WorkUnit(path))
            continue
        cuts = [size * k // partitions for k in range(partitions + 1)]
        units += [WorkUnit(path, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    total = sum(u.size for u in units) or 1
    groups: list[list[WorkUnit]] = [[] for _ in range(partitions)]
    done = 0
    for unit in units:
        k = min(partitions - 1, done * partitions // total)
        groups[k].append(unit)
        done += unit.size
    return groups


def _count_newlines(path: str, nbytes: int) -> int:
    count = 0
    with open(path, "rb") as f:
        while nbytes > 0:
            block = f.read(min(nbytes, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            nbytes -= len(block)
    return count


def iter_unit_lines(unit: WorkUnit, kind: str = "text") -> Iterator[Line]:
    """Non-blank lines of a work unit with their 1-based line numbers in the file."""
    if _is_gzip(unit.path):
        with gzip.open(unit.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield unit.path, lineno, raw, kind
        return
    end = float("inf") if unit.end is None else unit.end
    with open(unit.path, "rb") as f:
        if unit.start > 0:
            f.seek(unit.start - 1)
            f.readline()  # skip to the first line starting at or after unit.start
        pos = f.tell()
        lineno = _count_newlines(unit.path, pos) + 1 if pos else 1
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            if raw.strip():
                yield unit.path, lineno, raw, kind
            lineno += 1
            pos += len(raw)


def iter_lines(units: list[WorkUnit], kind: str = "text") -> Iterator[Line]:
    """Lines of several work units, in order."""
    for unit in units:
        yield from iter_unit_lines(unit, kind)


def chunked(lines, max_lines: int = 256, max_bytes: int = 1 << 20) -> Iterator[list[Line]]:
    """Group lines into chunks (the unit of work sent to a worker)."""
    chunk: list[Line] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line[2])
        if len(chunk) >= max_lines or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk

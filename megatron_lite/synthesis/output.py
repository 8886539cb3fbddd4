"""Resumable JSONL output and progress lines.

Each output record carries an integer ``id`` (the attempt or input index it came from), written
in increasing order. A restart reads the complete records back, drops a torn last line (a record
cut by a kill mid-write), and continues after the last ``id``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable


class OutputError(ValueError):
    """The existing output file cannot be resumed."""


def read_resumable(path: str, log: Callable[[str], None]) -> list[dict]:
    """Complete records of an earlier run's output (``[]`` when there is none).

    A last line without a newline or that is not valid JSON is torn: it is cut off the file
    (reported through ``log``). Any other bad line raises ``OutputError`` naming ``file:line``.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records, good_bytes = [], 0
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("id"), int):
                raise ValueError("record has no integer 'id'")
        except ValueError as e:
            if lineno == len(lines) and not tail:
                tail = line + b"\n"  # a torn last line that happens to end with a newline
                break
            raise OutputError(f"{path}:{lineno}: cannot resume from this output ({e})") from None
        if records and record["id"] <= records[-1]["id"]:
            raise OutputError(
                f"{path}:{lineno}: ids not increasing ({record['id']} after {records[-1]['id']})"
            )
        records.append(record)
        good_bytes += len(line) + 1
    if tail:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
        log(f"resume: dropped a torn last line of {len(tail)} bytes from {path}")
    return records


class JsonlWriter:
    """Appends records one line at a time, flushed so a kill loses at most the line being written."""

    def __init__(self, path: str):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        """Write one record and flush it to the OS."""
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        """Flush, fsync and close."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def stderr_log(msg: str) -> None:
    """Default log sink: one line to stderr."""
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Counts of done/skipped records; prints a line at most every ``interval_s`` seconds."""

    def __init__(self, method: str, log: Callable[[str], None], interval_s: float = 10.0, done: int = 0):
        self.method, self.log, self.interval_s = method, log, interval_s
        self.start = self.last = time.monotonic()
        self.resumed = done  # records already in the output when this run started
        self.written = 0
        self.skipped: Counter[str] = Counter()

    def wrote(self) -> None:
        """One record written."""
        self.written += 1
        self.maybe_report()

    def skip(self, reason: str, detail: str | None = None) -> None:
        """One record skipped for ``reason``; ``detail`` (if given) is logged as its own line."""
        self.skipped[reason] += 1
        if detail:
            self.log(f"{self.method}: skipped ({reason}): {detail}")
        self.maybe_report()

    def line(self) -> str:
        """``records done, per second, skipped by reason``."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.method}: {self.resumed + self.written} records done ({self.written} this run, "
            f"{self.written / elapsed:.2f}/s), skipped {sum(self.skipped.values())} ({skipped})"
        )

    def maybe_report(self, force: bool = False) -> None:
        """Log the progress line if ``interval_s`` passed since the last one (or ``force``)."""
        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            self.last = now
            self.log(self.line())

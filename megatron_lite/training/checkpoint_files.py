"""Checkpoint files: atomic writes with their sha256, and reads that check digests and finiteness.

``checkpoint.py`` lays files out and decides who writes what; this module owns what happens to one
file: written to ``.tmp``, fsynced and renamed (a reader never sees half a file), digested from
what is on disk, and on load compared with the digest stored in the checkpoint's
``metadata.json`` and scanned for inf/NaN, so a flipped byte or a poisoned weight is refused with
the file's (and the tensor's) name instead of training on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "metadata.json"  # sha256 of every file and the saving world size (rank 0 writes it)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


def atomic_save(obj: Any, path: Path) -> str:
    """torch.save to ``path.tmp``, fsync, rename: a reader never sees half a file. Returns its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError:  # torch reports a short write ("unexpected pos"); surface the OS's reason
            _raise_os_error(f)
            raise
        f.flush()
        os.fsync(f.fileno())
    digest = file_digest(tmp)  # read back from the page cache: digests what is on disk
    os.replace(tmp, path)
    return digest


def _raise_os_error(f) -> None:
    """Write one more byte: a full disk or a file-size limit raises the OSError torch swallowed."""
    f.write(b"\0")
    f.flush()
    os.fsync(f.fileno())


def file_digest(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """Dotted name of the first floating-point tensor in a nested dict/list holding inf or NaN."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return prefix or "<tensor>" if bad else None
    items = ()
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    for key, value in items:
        name = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if name is not None:
            return name
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(iter_dir: Path) -> dict[str, Any] | None:
    """``iter_dir/metadata.json`` (digests, saving world size), None for checkpoints written without it."""
    path = iter_dir / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta.get("sha256"), dict):
            raise ValueError("no sha256 table")
        return meta
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt: {exc}") from None


def read_state(path: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load one checkpoint file (CPU, weights only), checking its digest when ``meta`` lists it.

    Raises:
        CheckpointError: the file is missing, its digest differs, it is unreadable, or it holds
            a non-finite tensor (named).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if meta is not None:
        want = _expected_digest(path, meta)
        if want is not None and file_digest(path) != want:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its sha256 differs from the one in {METADATA_FILE}"
            )
    state = _torch_load(path)
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint file {path} holds a non-finite tensor: {bad}")
    return state


def _expected_digest(path: Path, meta: dict[str, Any]) -> str | None:
    """The digest ``meta`` lists for ``path`` (keys are relative to the ``iter_N`` directory)."""
    for depth in (2, 1):  # rng/rank_X.pt, mp_rank_XX/file.pt
        key = "/".join(path.parts[-depth:])
        if key in meta["sha256"]:
            return meta["sha256"][key]
    return None


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {reason}") from None


def write_metadata(tmp: Path, iteration: int, world_size: int, rank_digests: list[dict[str, str]]) -> None:
    """Write ``tmp/metadata.json``: the sha256 of ``config.yaml`` and of every rank's files."""
    digests = {"config.yaml": file_digest(tmp / "config.yaml")}
    for d in rank_digests:
        digests.update(d)
    meta = {"format": 1, "iteration": iteration, "world_size": world_size, "sha256": digests}
    _atomic_write_text(tmp / METADATA_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def os_reason(exc: Exception, where: Path) -> str:
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename or where})"
    return f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__} ({where})"


def first_error(values: list[Any]) -> tuple[int, Any] | None:
    """(rank, value) of the first non-None value of a rank-ordered list."""
    return next(((r, v) for r, v in enumerate(values) if v is not None), None)

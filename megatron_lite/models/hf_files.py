"""The on-disk side of Hugging Face checkpoints: file names, lazy safetensors reading, sharded writing.

``hf_io`` maps names and shapes; this module only knows files. Writers build everything in a
temporary directory that ``move_into_place`` renames, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint is missing, malformed, or disagrees with its config."""


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a Hugging Face checkpoint (config.json + safetensors)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


class SafetensorsReader:
    """Lazy, read-only view of a checkpoint's tensors: single ``model.safetensors`` or sharded.

    Calling the reader with a name returns that tensor (``KeyError`` when absent); files are
    opened on first use and memory-mapped, so only the tensors asked for are read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        self._listing = index if index.is_file() else single  # the file that says what exists
        if index.is_file():
            self._file_of = self._read_index(index)
        elif single.is_file():
            self._file_of = {k: single for k in self._open(single).keys()}
        else:
            raise HFCheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)"
            )

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.path / str(file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFCheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise HFCheckpointError(f"{index}: lists shard {file.name}, which does not exist")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), "pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise HFCheckpointError(f"{file}: cannot read safetensors ({e})") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._file_of)

    def where(self, name: str) -> str:
        """The file holding ``name`` (or the index / single file that should have listed it)."""
        return str(self._file_of.get(name, self._listing))

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(name)
        handle = self._open(self._file_of[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise HFCheckpointError(f"{self._file_of[name]}: cannot read tensor {name} ({e})") from None

    def close(self) -> None:
        """Release the open files."""
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], out: Path, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """Group tensors into shards of at most ``max_shard_bytes`` (one bigger tensor gets its own)."""
    from safetensors.torch import save_file

    shard_files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        file = out / f"shard-{len(shard_files)}.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        shard_files.append((file, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        t = tensor.to(device="cpu", dtype=dtype, copy=True).contiguous()  # own storage: no shared views
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
    if shard or not shard_files:
        flush()
    if len(shard_files) == 1:
        shard_files[0][0].rename(out / SINGLE_FILE)
        return
    weight_map = {}
    for k, (file, names) in enumerate(shard_files, start=1):
        final = f"model-{k:05d}-of-{len(shard_files):05d}.safetensors"
        file.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing empty directory is removed, a full one replaced."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        tmp.rename(path)
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)

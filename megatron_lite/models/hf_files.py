"""The on-disk side of Hugging Face checkpoints: file names, lazy safetensors reading, sharded writing.

``hf_io`` maps names and shapes; this module only knows files. Writers build everything in a
temporary directory that ``move_into_place`` renames, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
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

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of tensor ``name`` (its data is not read)."""
        code = self._open(self._file_of[name]).get_slice(name).get_dtype()
        known = {v: k for k, v in _ST_DTYPES.items()}
        if code not in known:
            raise HFCheckpointError(f"{self._file_of[name]}: tensor {name} has unsupported dtype {code}")
        return known[code]

    def close(self) -> None:
        """Release the open files (they are reopened when a tensor is asked for again)."""
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group ``(name, shape)`` in order into files of at most ``max_shard_bytes`` (a bigger tensor
    gets a file of its own)."""
    files: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, tuple(shape)))
        size += nbytes
    return files


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The safetensors header (8-byte length, then JSON padded with spaces to 8 bytes)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        end = offset + math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    out: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> None:
    """Stream ``tensors`` into ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index.

    The files are written tensor by tensor: each header is computed from ``specs`` (every
    ``(name, shape)`` in the order ``tensors`` yields them), so memory holds one tensor at a time.

    Args:
        out: directory to write into.
        specs: ``(name, shape)`` of every tensor, in order.
        tensors: ``(name, tensor)`` in the order of ``specs``; each is cast to ``dtype``.
        dtype: dtype on disk.
        max_shard_bytes: shard size limit.
    """
    if dtype not in _ST_DTYPES:
        raise HFCheckpointError(f"dtype {dtype} cannot be written to safetensors")
    files = plan_shards(specs, dtype, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(files) == 1
        else [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    )
    stream = iter(tensors)
    for file_name, entries in zip(names, files):
        with open(out / file_name, "wb") as f:
            f.write(_header(entries, dtype))
            for name, shape in entries:
                got, tensor = next(stream)
                if got != name or tuple(tensor.shape) != shape:  # a bug in the caller, not bad input
                    raise RuntimeError(
                        f"expected tensor {name} {list(shape)}, got {got} {list(tensor.shape)}"
                    )
                data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
                f.write(data.reshape(-1).view(torch.uint8).numpy().data)
    if len(files) > 1:
        weight_map = {name: file for file, entries in zip(names, files) for name, _ in entries}
        total = sum(math.prod(shape) for _, shape in specs) * dtype.itemsize
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

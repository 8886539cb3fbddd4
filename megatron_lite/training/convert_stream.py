"""Sources of canonical tensors read one at a time, so conversion runs in bounded memory.

A conversion asks its source for one full canonical tensor at a time (``source.get(name)``) and
writes it out before asking for the next (``convert.write_model_checkpoint`` builds one shard file
at a time, ``hf_io.write_hf_checkpoint`` streams safetensors). Memory is then one output shard
file plus a few tensors, whatever the size of the model:

* ``HFSource``: safetensors read with ``safe_open`` (a tensor is read when asked for; the files
  are closed after each tensor, as an open mapping keeps every page it has read resident).
* ``CheckpointSource``: the shard files of a training checkpoint of any layout, loaded with
  ``torch.load(mmap=True)`` for each tensor asked for, so only that tensor's pieces are paged in
  and the mapping is dropped with them (a mapping kept open would keep every page it ever touched
  resident, growing to the size of the checkpoint).

Tensors keep the source's dtype (a conversion casts only when asked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from megatron_lite.config import Config, config_from_dict
from megatron_lite.models.hf_files import is_hf_dir
from megatron_lite.models.hf_io import (
    SafetensorsReader,
    _check_no_unexpected,
    hf_state_to_canonical,
    read_hf_config,
)
from megatron_lite.parallel.sharding import unshard_tensors
from megatron_lite.training import checkpoint
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.convert import layout_dims, read_checkpoint_config, shard_writers


class HFSource:
    """A Hugging Face directory as canonical tensors, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        model_cfg = read_hf_config(path)
        self.config: Config = config_from_dict({"model": dataclasses.asdict(model_cfg)})
        self.reader = SafetensorsReader(path)
        _check_no_unexpected(self.reader, model_cfg)

    def describe(self) -> str:
        """One line for the progress log."""
        return f"Hugging Face checkpoint {self.path} ({self.config.model.arch})"

    def get(self, name: str) -> torch.Tensor:
        """The full canonical tensor ``name``."""
        ((_, tensor),) = hf_state_to_canonical(
            self.reader, self.config.model, [name], where=self.reader.where
        )
        # safe_open memory-maps: pages read stay resident while a file is open, so close the
        # files after each tensor (they reopen on the next; a header parse costs microseconds)
        self.reader.close()
        return tensor

    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of the first tensor in the files)."""
        return self.reader.dtype(self.reader.keys()[0])

    def close(self) -> None:
        """Release the open files."""
        self.reader.close()


def _lazy_state(file: Path) -> dict:
    """A shard file's contents, memory-mapped: nothing is read until a tensor's data is used."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint file {file} is corrupt or unreadable: {reason}") from None


class CheckpointSource:
    """The model weights of a training checkpoint of any (tp, pp, ep) layout, one tensor at a time.

    ``weights``: ``"model"`` reads the weights (the fp32 main values under mixed precision),
    ``"ema"`` their exponential moving average (``training.ema_decay``, stored under ``"ema"``).
    """

    def __init__(self, root: str | Path, iteration: int | None = None, weights: str = "model"):
        self.root, self.key = Path(root), weights
        self.config, self.iteration = read_checkpoint_config(root, iteration)
        par = self.config.parallel
        self.dims = layout_dims(par.tensor, par.pipeline, par.expert, par.expert_tensor)
        self.it_dir = checkpoint.iteration_dir(root, self.iteration)
        self.files = {
            r: self.it_dir / checkpoint.shard_name(self.dims, r) / checkpoint.MODEL_FILE
            for r in shard_writers(self.dims)
        }
        self.holders: dict[str, list[int]] = {}  # name -> ranks of one pipeline stage holding it
        stage_of: dict[str, int] = {}
        for rank, file in self.files.items():
            pp = self.dims.coords(rank).pp
            state = _lazy_state(file)
            if state.get(self.key) is None:
                raise CheckpointError(
                    f"{file}: holds no EMA weights (the run was trained without training.ema_decay); "
                    "export --weights model"
                )
            for name in state[self.key]:
                # a tied embedding is stored by the first and the last stage: read the first's
                if stage_of.setdefault(name, pp) == pp:
                    self.holders.setdefault(name, []).append(rank)

    def describe(self) -> str:
        """One line for the progress log."""
        par = self.config.parallel
        what = "EMA weights of training checkpoint" if self.key == "ema" else "training checkpoint"
        return (
            f"{what} {self.root} iteration {self.iteration} "
            f"(tp={par.tensor}, pp={par.pipeline}, ep={par.expert})"
        )

    def get(self, name: str) -> torch.Tensor:
        """The full canonical tensor ``name``, reassembled from the shard files that hold it."""
        if name not in self.holders:
            raise CheckpointError(f"{self.it_dir}: no shard file holds {name}")
        pieces = {}
        for rank in self.holders[name]:
            model = _lazy_state(self.files[rank])[self.key]
            if name not in model:
                raise CheckpointError(f"{self.files[rank]}: lost tensor {name} while converting")
            pieces[rank] = model[name]
        try:
            return unshard_tensors(pieces, name, self.config.model, self.dims)
        except ValueError as exc:
            raise CheckpointError(f"{self.it_dir}: {exc}") from None

    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of the first stored tensor; its data is not read)."""
        rank = min(self.files)
        return next(iter(_lazy_state(self.files[rank])[self.key].values())).dtype

    def close(self) -> None:
        """Nothing stays open between tensors."""


class LazyState(Mapping):
    """A source as a read-only state dict whose tensors are read when looked up (one at a time)."""

    def __init__(self, source: CheckpointSource):
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.source.holders:
            raise KeyError(name)
        return self.source.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.source.holders

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.holders)

    def __len__(self) -> int:
        return len(self.source.holders)


def open_source(
    path: str | Path, iteration: int | None = None, weights: str = "model"
) -> HFSource | CheckpointSource:
    """The conversion input at ``path``: an HF directory or a training checkpoint (detected).

    ``weights="ema"`` reads a training checkpoint's EMA of the weights (``CheckpointSource``).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if is_hf_dir(path):
        if weights != "model":
            raise CheckpointError(f"{path}: a Hugging Face directory has no EMA weights (--weights ema)")
        return HFSource(path)
    if not (path / checkpoint.TRACKER).is_file() and iteration is None:
        raise CheckpointError(
            f"{path}: neither a Hugging Face checkpoint (config.json + model.safetensors or "
            f"model.safetensors.index.json) nor a training checkpoint ({checkpoint.TRACKER}); "
            f"it holds {_listing(path)}"
        )
    return CheckpointSource(path, iteration, weights)


def _listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

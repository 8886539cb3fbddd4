"""On-disk cache of dataset index arrays, built once (rank 0) and memory-mapped everywhere.

Arrays are keyed by the md5 of a JSON description of everything they depend on. Files are
written under temporary names and renamed; the description file is written last and marks a
complete entry. With ``torch.distributed`` initialised, rank 0 of ``group`` builds while the
others wait in a collective, then every rank memory-maps the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable

import numpy as np


def description_hash(description: dict) -> str:
    """md5 hex digest of the canonical JSON of ``description``."""
    text = json.dumps(description, sort_keys=True, indent=4)
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def cache_paths(cache_dir: str, stem: str, description: dict, names: list[str]) -> dict[str, str]:
    """File of each array (``<md5>-<stem>-<name>.npy``) plus ``"description"`` (the JSON)."""
    key = description_hash(description)
    paths = {name: os.path.join(cache_dir, f"{key}-{stem}-{name}.npy") for name in names}
    paths["description"] = os.path.join(cache_dir, f"{key}-{stem}-description.json")
    return paths


def _save(paths: dict[str, str], arrays: dict[str, np.ndarray], description: dict) -> None:
    os.makedirs(os.path.dirname(paths["description"]), exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    for name, arr in arrays.items():
        tmp = paths[name] + tag + ".npy"
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, paths[name])
    tmp = paths["description"] + tag
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(description, f, sort_keys=True, indent=4)
    os.replace(tmp, paths["description"])


def _load(paths: dict[str, str], names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}


def _is_complete(paths: dict[str, str]) -> bool:
    return all(os.path.isfile(p) for p in paths.values())


def _group_rank(group) -> int | None:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(group)


def _all_ok(ok: bool, group) -> bool:
    """Collective that doubles as the barrier: True when every rank of ``group`` reports ok."""
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def load_or_build(
    cache_dir: str | None,
    stem: str,
    description: dict,
    names: list[str],
    build: Callable[[], dict[str, np.ndarray]],
    group=None,
    log: Callable[[str], None] = print,
) -> dict[str, np.ndarray]:
    """Return the arrays ``names`` from the cache, building (and caching) them if needed.

    Args:
        cache_dir: directory of the cache; None builds in memory on every rank.
        stem: class/split tag in the file names, e.g. ``"GPTDataset-train"``.
        description: JSON-able dict of every parameter the arrays depend on.
        names: arrays ``build`` returns.
        build: computes the arrays (called on rank 0 of ``group`` only when distributed).
        group: torch.distributed process group (default: the world).
        log: where the building rank reports what it builds and how long it took.
    """
    rank = _group_rank(group)
    say = log if rank in (None, 0) else (lambda _line: None)
    if cache_dir is None:
        return _timed_build(stem, build, say)
    paths = cache_paths(cache_dir, stem, description, names)
    if rank is None:
        if not _is_complete(paths):
            _build_and_save(paths, stem, description, build, say)
        return _load(paths, names)
    ok, error = True, None
    if rank == 0 and not _is_complete(paths):
        try:
            _build_and_save(paths, stem, description, build, say)
        except Exception as exc:  # reported to the other ranks through the collective below
            ok, error = False, exc
    if not _all_ok(ok, group):
        if error is not None:
            raise error
        raise RuntimeError(f"building the {stem} index cache in {cache_dir} failed on rank 0 of the group")
    if not _is_complete(paths):
        raise FileNotFoundError(
            f"{paths['description']} missing after rank 0 built it: is cache_dir shared by all ranks?"
        )
    return _load(paths, names)


def _build_and_save(paths: dict[str, str], stem: str, description: dict, build, say) -> None:
    _save(paths, _timed_build(stem, build, say), description)
    say(f" > cached {stem} indices in {paths['description']}")


def _timed_build(stem: str, build: Callable[[], dict[str, np.ndarray]], say) -> dict[str, np.ndarray]:
    """``build()``, announced before and timed after (index builds of big corpora take a while)."""
    say(f" > building {stem} indices ...")
    start = time.perf_counter()
    arrays = build()
    sizes = ", ".join(f"{name} {len(arr):,}" for name, arr in arrays.items())
    say(f" > built {stem} indices in {time.perf_counter() - start:.2f} s ({sizes})")
    return arrays


def default_cache_dir(prefix: str) -> str | None:
    """``<dir of prefix>/cache`` when it can be created, else None (in-memory indices)."""
    path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        warnings.warn(f"cannot create index cache {path}: indices are rebuilt in memory", stacklevel=2)
        return None
    if not os.access(path, os.W_OK):
        warnings.warn(f"index cache {path} is not writable: indices are rebuilt in memory", stacklevel=2)
        return None
    return path

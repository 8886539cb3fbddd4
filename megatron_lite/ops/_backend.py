"""Choosing the face of an op: the compiled kernel (``megatron_lite._C``) or the torch reference.

The backend is ``"auto"`` by default: the compiled kernel when ``megatron_lite._C`` imports and
has the op for the tensor's device, otherwise the pure-torch reference, with one warning per op
that says why. ``"compiled"`` turns that fallback into an error (for tests and benchmarks that
must measure the kernel); ``"reference"`` always runs the reference, silently.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "compiled", "reference")

_backend = "auto"
_warned: set[str] = set()
# (module or None, why it is unavailable); filled on first use so importing ops stays cheap.
_compiled: tuple[ModuleType | None, str] | None = None


def set_backend(name: str) -> None:
    """Selects the face every op in ``megatron_lite.ops`` runs.

    Args:
        name: ``"auto"`` (compiled when available, else reference with a one-time warning),
            ``"compiled"`` (raise if the kernel is unavailable) or ``"reference"``.

    Raises:
        ValueError: if ``name`` is not one of the three.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """Returns the current backend name (see :func:`set_backend`)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def reset_warnings() -> None:
    """Forgets which fallback warnings were already issued (tests use this)."""
    _warned.clear()


def load_compiled() -> tuple[ModuleType | None, str]:
    """Imports ``megatron_lite._C`` once.

    Returns:
        ``(module, "")`` on success, ``(None, reason)`` when the extension cannot be imported.
    """
    global _compiled
    if _compiled is None:
        try:
            _compiled = (importlib.import_module("megatron_lite._C"), "")
        except ImportError as exc:  # not built, or built against another torch
            _compiled = (
                None,
                f"megatron_lite._C could not be imported ({exc}); "
                "build it with `pip install --no-build-isolation -e .`",
            )
    return _compiled


def unavailable_reason(op: str, device: torch.device) -> str | None:
    """Says why the compiled ``op`` cannot run on ``device``, or None when it can."""
    module, reason = load_compiled()
    if module is None:
        return reason
    if not hasattr(module, op):
        return f"megatron_lite._C has no {op!r} (stale build? rebuild the extension)"
    if device.type == "cuda" and not getattr(module, "with_cuda", False):
        return "megatron_lite._C was built without CUDA (torch had no CUDA or no toolkit at build time)"
    if device.type not in ("cpu", "cuda"):
        return f"no compiled kernel for device type {device.type!r}"
    return None


def warn_once(op: str, message: str) -> None:
    """Issues ``message`` as a RuntimeWarning the first time it is seen for ``op``."""
    if op not in _warned:
        _warned.add(op)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def compiled_module(op: str, device: torch.device) -> ModuleType | None:
    """Resolves which face runs ``op`` on ``device``.

    Returns:
        The ``megatron_lite._C`` module when its ``op`` (and the sibling kernels its backward
        uses) must run, or None when the reference must run: forced, or unavailable under
        ``"auto"`` (the latter warns once per op).

    Raises:
        RuntimeError: under ``"compiled"`` when the kernel is unavailable.
    """
    if _backend == "reference":
        return None
    reason = unavailable_reason(op, device)
    if reason is None:
        return load_compiled()[0]
    if _backend == "compiled":
        raise RuntimeError(f"{op}: backend 'compiled' was requested but {reason}")
    warn_once(op, f"{op}: falling back to the pure-torch reference because {reason}")
    return None

"""Input validation for ``megatron_lite.ops`` with messages that name the argument.

Messages follow one pattern so users can grep them:
``"moe_permute: indices must be int64 [T, k], got torch.int32 [4, 2]"``.
Wrong types and dtypes raise TypeError; wrong shapes, devices and values raise ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    """``"torch.int32 [4, 2]"``: the dtype and shape of ``t`` as the messages print them."""
    return f"{t.dtype} [{', '.join(str(d) for d in t.shape)}]"


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    expect: str,
    ndim: int,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    """Checks that ``t`` is a tensor with ``ndim`` dims and one of ``dtypes``.

    Args:
        op: the public op name, first word of the message.
        name: the argument name.
        t: the value passed.
        expect: what was expected, e.g. ``"int64 [T, k]"``.
        ndim: required number of dimensions.
        dtypes: allowed dtypes (None: any).

    Returns:
        ``t``, for chaining.

    Raises:
        TypeError: not a tensor, or a dtype outside ``dtypes``.
        ValueError: wrong number of dimensions.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {expect}, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {expect}, got {describe(t)}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {expect}, got {describe(t)}")
    return t


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raises ValueError when ``t`` and ``ref`` live on different devices."""
    if t.device != ref.device:
        raise ValueError(
            f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
        )


def check_int(op: str, name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Checks that ``value`` is a Python int (bools excluded) in ``[low, high]``.

    Raises:
        TypeError: not an int.
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{op}: {name} must be >= {low}{upper}, got {value}")
    return value

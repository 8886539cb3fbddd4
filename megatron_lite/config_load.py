"""Building a ``Config``: strict YAML loading, ``--section.field`` overrides, Megatron flags.

Every error names the offending field and value (``ConfigError``); ``load_config`` validates the
result before returning it, so nothing downstream sees an unchecked config.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_lite.config import Config, ConfigError


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(path, args[0], value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_coerce(f"{path}[{i}]", inner, v) for i, v in enumerate(items)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{path} ({value!r}) must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path} ({value!r}) must be an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} ({value!r}) must be an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"{path} ({value!r}) must be an integer")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} ({value!r}) must be a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path} ({value!r}) must be a string")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp}")


def _section_from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a ``Config`` from a nested dict, rejecting unknown sections and keys (not validated)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} (known: {', '.join(hints)})")
    return Config(**{k: _section_from_dict(hints[k], v or {}, k) for k, v in data.items()})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (may be None for defaults), apply ``--section.field value`` overrides, validate.

    Args:
        path: YAML file with one mapping per section.
        overrides: command-line tokens, e.g. ``["--parallel.tensor", "2", "--data.path", "0.7", "a"]``.
            A list-valued field takes every token up to the next ``--``.

    Returns:
        The validated config.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for key, value in _parse_overrides(overrides or []):
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override --{key} must look like --section.field")
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"section {section} in the config file is not a mapping")
        sec[name] = value
    return config_from_dict(data).validate()


def _parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.field value")
        key, eq, inline = tok[2:].partition("=")
        values = [inline] if eq else []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        if not values:
            raise ConfigError(f"override --{key} has no value")
        out.append((key.replace("-", "_"), values[0] if len(values) == 1 else values))
    return out


def main_argv_to_config(argv: list[str] | None = None) -> Config:
    """Parse ``--config FILE`` plus overrides from ``argv`` (default ``sys.argv[1:]``).

    Megatron-LM's ``pretrain_gpt.py`` flags are accepted too (``megatron_args.FLAGS``).
    """
    from megatron_lite.megatron_args import translate

    argv = translate(list(sys.argv[1:] if argv is None else argv))
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        path = argv[i + 1]
        del argv[i : i + 2]
    return load_config(path, argv)

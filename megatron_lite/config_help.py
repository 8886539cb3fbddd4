"""``--help`` text: every config field with its type, default and meaning, and the Megatron flags.

Types and defaults come from the dataclasses in ``config.py``; the one-line meanings from the
``Attributes:`` section of each dataclass's docstring, so a field is documented where it is
declared.
"""

from __future__ import annotations

import dataclasses
import typing

from megatron_lite.config import Config


def field_docs(cls: type) -> dict[str, str]:
    """``field -> meaning`` from the ``Attributes:`` section of ``cls``'s Google-style docstring."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    if not any(line.strip() == "Attributes:" for line in lines):
        return docs
    start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    indent, last = None, None
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth == indent and ":" in line:
            last, _, text = line.strip().partition(":")
            docs[last] = text.strip()
        elif depth > indent and last is not None:  # a continuation line
            docs[last] += " " + line.strip()
    return docs


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def config_fields() -> list[tuple[str, str, object, str]]:
    """``(--section.field, type, default, meaning)`` of every config field, in declaration order."""
    rows = []
    sections = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = sections[section.name]
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            rows.append(
                (f"--{section.name}.{f.name}", _type_name(hints[f.name]), _default(f), docs.get(f.name, ""))
            )
    return rows


def config_help() -> str:
    """The ``--help`` text for the config fields and the accepted Megatron-LM flags."""
    from megatron_lite.megatron_args import FLAGS

    rows = config_fields()
    width = max(len(name) for name, *_ in rows) + 2
    out = ["Config fields (set in the --config YAML as section: {field: value}, or on the command line):"]
    for name, type_name, default, meaning in rows:
        out.append(f"  {name:<{width}}{type_name} = {default!r}")
        out.append(f"  {'':<{width}}{meaning}")
    out.append("")
    out.append("Megatron-LM pretrain_gpt.py flags accepted instead (anything else is refused):")
    width = max(len(f.name) for f in FLAGS) + 2
    for f in FLAGS:
        target = f"-> --{f.target}" if f.target else "(accepted, no effect)"
        out.append(f"  {f.name:<{width}}{target}  {f.meaning}")
    return "\n".join(out)

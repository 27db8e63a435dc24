"""Frozen-dataclass configuration loaded from TOML with unknown keys rejected (STYLE.md).

``load_config(cls, path, overrides)`` builds ``cls`` from an optional TOML file and ``key=value``
overrides (values parsed as TOML literals, so ``lr=1e-3``, ``budgets=[0.5, 1.0]``, ``name="x"``).
Nested dataclass fields are addressed with dots (``optim.lr=1e-4``).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def _build(cls, data: dict, where: str):
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} in {where or cls.__name__}; known keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, f"{where}.{name}" if where else name)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    """A plain dict of a (nested) config dataclass, tuples as lists, paths as strings."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """Build the frozen dataclass ``cls`` from TOML ``path`` (optional) and ``overrides``.

    Raises ``ValueError`` naming any unknown key or malformed override.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for ov in overrides:
            if "=" not in ov:
                raise ValueError(f"override must look like key=value, got {ov!r}")
            k, v = ov.split("=", 1)
            parsed.append((k.strip(), _parse_value(v.strip())))
        items = parsed
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _build(cls, data, "")

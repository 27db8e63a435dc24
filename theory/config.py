"""Frozen-dataclass configuration loaded from TOML with unknown keys rejected.

``load_config(cls, path, overrides)`` builds ``cls`` from an optional TOML file and ``key=value``
overrides (values must be TOML literals: ``lr=1e-3``, ``budgets=[0.5, 1.0]``, ``name="x"``; a bare
word is an error). Nested dataclass fields are addressed with dots (``optim.lr=1e-4``). Every value
is checked against its field's type (int, float, bool, str, tuples/lists of them, nested tables)
before the dataclass is built, so a wrong type is one ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config dataclass


def _parse_value(key: str, text: str) -> Any:
    """A ``--set`` value as a TOML literal; anything else (an unquoted word, ``[a``) is an error."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ValueError(f"--set {key}={text}: {text!r} is not a TOML literal (numbers as 2000 or 1e-3, "
                         f"true/false, strings in quotes: --set '{key}=\"text\"', lists as [0.1, 0.2] "
                         f"or [\"a\", \"b\"])") from None


_PLAIN = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
          str: ("a quoted string", "quoted strings")}


def _describe(hint, plural: bool = False) -> str:
    if typing.get_origin(hint) in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe(args[0], True)}" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__} keys"
    if hint in _PLAIN:
        return _PLAIN[hint][plural]
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def _coerce(value: Any, hint, where: str) -> Any:
    """``value`` checked against the field type ``hint`` (ints accepted where floats are meant,
    lists where tuples are); ``ValueError`` naming the key, the expected type and the value."""
    if hint is Any or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        for arm in typing.get_args(hint):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, where)
            except ValueError:
                continue
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        unset = " (or unset)" if len(arms) < len(typing.get_args(hint)) else ""
        raise ValueError(f"{where} must be {' or '.join(_describe(a) for a in arms)}{unset}, got {_show(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be {_describe(hint)} (e.g. [{_show(value)}]), got {_show(value)}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table, got {_show(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a quoted string, got {_show(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{where} must be a quoted path, got {_show(value)}")
        return Path(value)
    return value


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
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{key} is a table of keys ({', '.join(sorted(f.name for f in dataclasses.fields(hint)))}), "
                                 f"got {_show(value)}; set one with --set {key}.KEY=VALUE")
            value = _build(hint, value, key)
        else:
            value = _coerce(value, hint, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a dataclass's own checks tripping over a value of another kind
        raise ValueError(f"{where or cls.__name__}: {exc}") from None


def config_to_dict(cfg: DataclassInstance) -> dict:
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


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> C:
    """Build the frozen dataclass ``cls`` from TOML ``path`` (optional) and ``overrides``.

    Raises ``ValueError`` naming any unknown key, malformed override or value of the wrong type.
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
            if not k.strip():
                raise ValueError(f"override must look like key=value, got {ov!r}")
            parsed.append((k.strip(), _parse_value(k.strip(), v.strip())))
        items = parsed
    for key, value in items:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(parts[:i + 1])} is not a table of keys; cannot set {key}")
        node[parts[-1]] = value
    return _build(cls, data, "")

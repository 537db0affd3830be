"""Loading a daemon's configuration: a TOML file, then environment variables over it.

A configuration is a frozen dataclass whose fields have defaults. ``load_settings`` reads the file's
top-level keys (names as the fields) and then, for each field, an environment variable
``<prefix><FIELD NAME IN UPPER CASE>``; the environment wins. Values are converted to the field's
type; an unknown key or a value of the wrong type is an error that names the key and where it came
from. Mappings (``dict[str, str]``) are written in the environment as ``a=x,b=y``; mappings of
lists (``Mapping[str, tuple[str, ...]]``, a TOML table of lists) as ``a=x y,b=z``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from twopc.errors import InvalidArgument

T = TypeVar("T")


def load_settings(cls: type[T], path: Path | None, environ: Mapping[str, str], prefix: str) -> T:
    """Builds ``cls`` from the TOML file at ``path`` (if any) and ``environ``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as stream:
                raw = tomllib.load(stream)
        except OSError as err:
            raise InvalidArgument(f"cannot read configuration file {path}: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgument(f"configuration file {path} is not valid TOML: {err}") from err
        values.update(raw)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise InvalidArgument(
            f"unknown setting(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(names))}"
        )
    converted: dict[str, Any] = {}
    for name in names:
        env_name = prefix + name.upper()
        if env_name in environ:
            converted[name] = _convert(hints[name], environ[env_name], env_name, from_text=True)
        elif name in values:
            converted[name] = _convert(hints[name], values[name], f"{name} in {path}", False)
    try:
        return cls(**converted)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"invalid configuration: {err}") from err


def _convert(hint: Any, value: Any, where: str, from_text: bool) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if from_text and value == "":
            return None
        return _convert(inner[0], value, where, from_text)
    if hint is bool:
        if from_text:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise InvalidArgument(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or (hint is int and isinstance(value, float)):
            raise InvalidArgument(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError) as err:
            raise InvalidArgument(f"{where}: expected a number, got {value!r}") from err
    if hint is str:
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        return Path(str(value))
    if origin is tuple:
        items = value.split(",") if from_text else value
        if not isinstance(items, list | tuple):
            raise InvalidArgument(f"{where}: expected a list, got {value!r}")
        return tuple(
            _convert(args[0], item.strip() if from_text else item, where, from_text)
            for item in items
            if not from_text or item.strip()
        )
    if origin in (dict, Mapping) or hint is dict:
        if from_text:
            pairs = [p for p in value.split(",") if p.strip()]
            if not all("=" in p for p in pairs):
                raise InvalidArgument(f"{where}: expected name=value,name=value, got {value!r}")
            parsed = {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}
            if len(args) == 2 and typing.get_origin(args[1]) is tuple:
                # name=a b,other=c: a list per name, its items separated by spaces
                return {
                    k: _convert(args[1], ",".join(v.split()), where, True)
                    for k, v in parsed.items()
                }
            return parsed
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where}: expected a table, got {value!r}")
        if len(args) == 2 and args[1] is not str:  # e.g. Mapping[str, tuple[str, ...]]
            return {str(k): _convert(args[1], v, f"{where} ({k})", False) for k, v in value.items()}
        return {str(k): str(v) for k, v in value.items()}
    raise InvalidArgument(f"{where}: unsupported setting type {hint!r}")

"""Builds typed, frozen dataclasses from untrusted mappings (YAML, JSON), naming the key of any bad value."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from trainers.errors import InputError

T = TypeVar("T")


class ConfigError(InputError, ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names its key."""


def from_mapping(cls: type[T], data: Any, where: str) -> T:
    """cls(**data) with every field type-checked; nested dataclasses recurse, and `where` prefixes messages."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (expected one of: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: missing required key")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise type(err)(f"{where}.{err}") from None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        # The first option the value fits (str | list[str] takes "a" or ["a", "b"]); else the error of the option
        # of the value's own shape (a list's items are what is wrong with a list), else the first one's.
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append((option, err))
        same_shape = [err for option, err in errors
                      if isinstance(value, (list, tuple)) == (typing.get_origin(option) in (list, tuple))]
        raise (same_shape or [err for _, err in errors])[0]
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    origin, items = typing.get_origin(hint), typing.get_args(hint)
    if origin is list or (origin is tuple and len(items) == 2 and items[1] is Ellipsis):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        return origin(_coerce(item, items[0], f"{where}[{i}]") for i, item in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{where}: must be a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(item, kind, f"{where}[{i}]") for i, (item, kind) in enumerate(zip(value, items)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if hint is float:
        # YAML writes 1 for 1.0: accept ints for floats, never bools or strings.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
        return value
    return value

"""The schema walker: dataclasses built from plain dicts (parsed YAML), with type checks, so an unknown key, a
wrong type or an impossible value fails before any work starts, with the dotted key in the message and, for a
misspelled key or name, the closest valid one. A leaf: it imports nothing of lowmem's but the errors.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from lowmem.errors import ConfigError, closest


def check_choice(value: Any, choices: typing.Iterable[Any], key: str) -> None:
    """ConfigError naming `key` and the closest choice when `value` is not one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{closest(str(value), map(str, choices))}")


class Registry(dict):
    """Classes by their `name`, for the config key `key` whose value names one. `@registry.register` adds a
    class; `registry.lookup(name)` gives it, or a ConfigError naming the closest valid name."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def register(self, cls: type) -> type:
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        check_choice(name, self, self.key)
        return self[name]



# Fields whose valid values are a registry's names: `field(metadata={"choices": ...})`, a function returning
# them, called when a config is read (so a newly registered class is a valid value without editing a schema).


def require(ok: bool, message: str) -> None:
    """ConfigError(message) unless `ok`: the one-line form of a value check."""
    if not ok:
        raise ConfigError(message)



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _number(text: str, key: str) -> int | float:
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is Literal:
        check_choice(value, args, key)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp in (float, int) and isinstance(value, str):
        value = _number(value, key)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan: no lr, decay or ratio is meaningful there
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args and origin is tuple and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if args:
            return type(value)(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{dotted}'{closest(str(key), fields)}")
        if "choices" in fields[key].metadata:  # a registry's names, checked as a Literal's values would be
            check_choice(value, fields[key].metadata["choices"](), dotted)
            kwargs[key] = value
        else:
            kwargs[key] = _convert(value, hints[key], dotted)
    required = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{required[0]}: missing; it has no default")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj



def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (empty dicts stay leaves)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat



def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out

"""Typed, frozen, validated configuration objects built from plain dicts.

A config section is a frozen dataclass. `from_dict` checks a mapping against it and
reports *every* problem at once (unknown keys, wrong types, bad units, values out of
range) in one `ConfigError`. Field constraints live in the field's metadata:

    steps: int = field(default=60, metadata=rule(min=1, help="optimizer steps"))

A dataclass may also define `problems(self) -> list[str]` for checks that span fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Union

from kd2edge.errors import ConfigError
from kd2edge.units import parse_bytes, parse_rate


class Bytes(int):
    """An int field that accepts sizes with units ("8GB")."""


class Rate(float):
    """A float field that accepts rates with units ("68GB/s"), stored as bytes/s."""


def rule(min: float | None = None, max: float | None = None, help: str = "") -> dict:
    """Field metadata: an inclusive numeric range and a one-line help text."""
    return {"min": min, "max": max, "help": help}


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "", source: str = "config"):
    """Build a frozen dataclass from a mapping, reporting all problems together.

    Args:
        cls: the dataclass type.
        data: the mapping (None counts as empty).
        where: dotted prefix for messages ("quantize" -> "quantize.bits: ...").
        source: what is being loaded (a file name), the start of the error message.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: with every problem found.
    """
    value, problems = _build(cls, data or {}, where)
    if problems:
        raise ConfigError(problems, source=source)
    return value


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Bytes):
        return int(obj)
    if isinstance(obj, Rate):
        return float(obj)
    return obj


def replace(obj: Any, **changes: Any):
    """`dataclasses.replace` that re-validates, for CLI flag overrides."""
    data = to_dict(obj)
    data.update({k: v for k, v in changes.items()})
    return from_dict(type(obj), data, source="flags")


def _build(cls: type, data: Any, where: str) -> tuple[Any, list[str]]:
    prefix = f"{where}." if where else ""
    if not isinstance(data, Mapping):
        return None, [f"{where or 'config'}: expected a table of keys, got {type(data).__name__}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = [
        f"{prefix}{key}: unknown key (known: {', '.join(sorted(fields))})"
        for key in data if key not in fields
    ]
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{prefix}{name}: missing (required)")
            continue
        value, errs = _coerce(hints[name], data[name], f"{prefix}{name}")
        problems += errs
        if not errs:
            errs = _check_range(value, f.metadata, f"{prefix}{name}")
            problems += errs
            kwargs[name] = value
    if problems:
        return None, problems
    obj = cls(**kwargs)
    check = getattr(obj, "problems", None)
    if check is not None:
        problems += [f"{prefix}{p}" for p in check()]
    return (obj if not problems else None), problems


def _check_range(value: Any, meta: Mapping, name: str) -> list[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return []
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        return [f"{name}: {value} is below the minimum {lo}"]
    if hi is not None and value > hi:
        return [f"{name}: {value} is above the maximum {hi}"]
    return []


def _coerce(tp: Any, value: Any, name: str) -> tuple[Any, list[str]]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None, []
        options = [a for a in args if a is not type(None)]
        errors: list[str] = []
        for option in options:
            coerced, errs = _coerce(option, value, name)
            if not errs:
                return coerced, []
            errors += errs
        return None, errors[:1]
    if origin is Literal:
        if value in args:
            return value, []
        return None, [f"{name}: {value!r} is not one of {', '.join(map(repr, args))}"]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return None, [f"{name}: expected a list, got {value!r}"]
        item_tp = args[0] if args else Any
        items, errors = [], []
        for i, v in enumerate(value):
            c, errs = _coerce(item_tp, v, f"{name}[{i}]")
            items.append(c)
            errors += errs
        return (tuple(items) if origin is tuple else items), errors
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is Bytes:
        try:
            return Bytes(parse_bytes(value)), []
        except ValueError as e:
            return None, [f"{name}: {e}"]
    if tp is Rate:
        try:
            return Rate(parse_rate(value)), []
        except ValueError as e:
            return None, [f"{name}: {e}"]
    if tp is bool:
        if isinstance(value, bool):
            return value, []
        return None, [f"{name}: expected true or false, got {value!r}"]
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, []
        return None, [f"{name}: expected a whole number, got {value!r}"]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), []
        return None, [f"{name}: expected a number, got {value!r}"]
    if tp is str:
        if isinstance(value, str):
            return value, []
        return None, [f"{name}: expected text, got {value!r}"]
    if tp is Any:
        return value, []
    raise TypeError(f"schema: unsupported annotation {tp!r} for {name}")

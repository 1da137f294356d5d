"""Typed config values: parsing YAML/override values to a dataclass field's type, and range checks.

Every failure raises `ConfigError` naming the dotted key, what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


# --------------------------------------------------------------------------------------------------
# Value parsing and checking, driven by the dataclass field types.

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a float", bool: "a bool (true/false)", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp, key: str) -> Any:
    """Convert `value` (from YAML or an override string) to the field type `tp`, or raise.

    Strings are parsed for numbers and bools so that `optim.lr=1e-6` works from the command line
    (and from YAML, whose 1.1 spec reads `1e-6` as a string).

    Args:
        value: the raw value.
        tp: the resolved field type (int, float, bool, str, Literal[...] or list[...]).
        key: the dotted key, for messages.
    """
    found = f"found {value!r} ({type(value).__name__})"
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {list(choices)}, {found}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, {found}")
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected {_type_name(tp)}, {found}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, {found}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, {found}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a run name written as a number in YAML
        raise ConfigError(f"{key}: expected {_type_name(tp)}, {found}")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _check_types(obj, section: str) -> None:
    """Re-check every field of a section dataclass (covers configs built directly in Python).

    Floats must be finite: inf or nan in a learning rate or a ratio would train NaN steps. A
    field whose documentation gives inf a meaning opts in with `field(metadata={"allow_inf": True})`
    (nan is never accepted).
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        value = getattr(obj, f.name)
        coerced = coerce(value, hints[f.name], key)
        floats = coerced if isinstance(coerced, list) else [coerced]
        for v in floats:
            if isinstance(v, float) and not (math.isfinite(v) or (f.metadata.get("allow_inf") and not math.isnan(v))):
                raise ConfigError(f"{key}: expected a finite number, found {value!r}")
        if hints[f.name] is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, coerced)  # accept 1 for 1.0
        elif type(coerced) is not type(value):
            raise ConfigError(f"{key}: expected {_type_name(hints[f.name])}, found {value!r} ({type(value).__name__})")


def _require(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, found {value!r}")


def _positive(obj, section: str, *names: str, allow_zero: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        _require(v >= 0 if allow_zero else v > 0, f"{section}.{n}", ">= 0" if allow_zero else "> 0", v)

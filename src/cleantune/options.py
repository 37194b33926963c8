"""Checking option values against the dataclass field types of runs, attacks and defenses.

Values come from the CLI, YAML/TOML files and grids, where `1e-4` is a string (YAML 1.1 wants a dot),
`epochs: 1.7` a float and `triggers: 5` an int. Each value is converted where that is exact (a number
string to a number, an integral float to int, 0/1 to a bool) and refused otherwise, so a bad value fails
before any data loads. An int given for a float option stays an int: the run id hashes the config, and
converting would give runs stored before this check new ids.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from types import NoneType, UnionType

from .errors import UserError

C_INT_MAX = 2**31 - 1  # sizes and counts that torch, PEFT and multiprocessing take as C ints


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is NoneType:
        return "nothing"
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        plural = {str: "strings", float: "numbers", int: "integers"}.get(args[0], _describe(args[0]))
        return f"a list of {plural}" if origin is list else f"{len(args)} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(value, hint):
    """`value` as the type `hint` describes, or ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, UnionType):
        for a in args:  # a value already of a member type is kept as it is (str | int keeps 5 an int)
            if (value is None and a is NoneType) or (a in (int, float, str, bool, dict) and type(value) is a):
                return value
        for a in args:
            try:
                return coerce(value, a)
            except ValueError:
                pass
        raise ValueError
    if hint is bool and value in (0, 1) and type(value) is int:
        return bool(value)
    if hint in (NoneType, bool, str, dict):
        if isinstance(value, hint):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return float(value)  # ValueError when it is not a number
        raise ValueError
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [coerce(v, args[0]) for v in value]
        raise ValueError
    if origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(coerce(v, a) for v, a in zip(value, args))
        raise ValueError
    return value


def check_values(cls, values: dict, label: str, extra: dict | None = None) -> dict:
    """`values` (field name -> value) converted to `cls`'s field types, or to the types `extra` gives names that
    are no field (a command's own keys, as `run`'s `store`); a one-line UserError otherwise. Other names pass
    through for the caller to report."""
    hints = typing.get_type_hints(cls) | (extra or {})
    names = {f.name for f in fields(cls)} | set(extra or ())
    out = dict(values)
    for k, v in values.items():
        if k in names:
            try:
                out[k] = coerce(v, hints[k])
            except (ValueError, TypeError):
                raise UserError(f"{label}: '{k}' expects {_describe(hints[k])}, got {v!r}") from None
    return out

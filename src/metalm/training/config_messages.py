"""The wording of training-config errors: pydantic's validation errors turned into one line that names the
key path, what was expected and what was found (``optim.lr: expected float, got 'abc'``)."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from metalm.schema import Location, declared_fields, dotted_path, locate, union_arms, value_at

__all__ = ["config_error", "describe", "error_message", "origin", "type_name"]


def describe(value: Any) -> str:
    """How a message names a value: ``null``, ``a mapping``, ``a list`` or its repr."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def type_name(tp: Any) -> str:
    """How a message names a declared type: ``int``, ``a list of str``, ``one of 'no', 'bf16'``."""
    if typing.get_origin(tp) is Annotated:
        return type_name(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    if union_arms(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of mappings" if _is_mapping_type(args[0]) else f"a list of {type_name(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is dict or tp is dict or _is_mapping_type(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _is_mapping_type(tp: Any) -> bool:
    return isinstance(tp, type) and (issubclass(tp, BaseModel) or hasattr(tp, "__dataclass_fields__"))


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<")}


def error_message(error: ErrorDetails, where: Location, data: Any) -> str:
    """Today's wording for one pydantic error, found at `where` in the raw config `data`."""
    kind = error["type"]
    if kind == "missing":
        return (
            "missing list item"
            if where.steps and isinstance(where.steps[-1], int)
            else "missing required key"
        )
    if error["loc"][-1:] == ("[key]",):
        return f"keys must be strings, got {error['input']!r}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = sorted(declared_fields(where.parent) or ())
        return f"unknown key; allowed keys here: {', '.join(allowed)}"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return f"must be {sign} {error['ctx'][name]}, got {error['input']}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    return f"expected {type_name(where.declared)}, got {describe(value_at(data, where.steps))}"


def origin(path: str, applied: dict[str, list[str | int]], default: str) -> str:
    """Name the override that set `path` (or a mapping above it), else the file."""
    for text, parts in applied.items():
        prefix = dotted_path(parts)
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return f"override {text!r}"
    return default


def config_error(
    err: ValidationError, data: Any, applied: dict[str, list[str | int]], source: str, model: type[BaseModel]
) -> str:
    """The first error of validating `data` as `model`, prefixed with the file or override that set the
    value and its key path."""
    error = err.errors()[0]
    where = locate(error, model)
    path = dotted_path(where.steps) or "<top level>"
    return f"{origin(path, applied, source)}: {path}: {error_message(error, where, data)}"

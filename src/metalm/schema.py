"""Where a pydantic validation error points, as a path into the validated data.

Pydantic's error locations (``loc``) mix three things: keys of the data, list indexes, and names of union
branches (``'str'``, ``'list[str]'``, or a discriminator's tag such as ``'vqa'``). Messages for people
(``configs/x.yaml: data.streams[0].weight: ...``, ``data.jsonl:3: field 'content[1].type': ...``) name only
the first two. :func:`locate` walks the declared types along a ``loc`` to tell them apart, so training
configs and JSONL records report their errors through this one function.

A validator that checks several fields at once raises :class:`FieldProblem` naming the key it blames,
relative to the model it validates; :func:`locate` appends it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import ErrorDetails

__all__ = ["FieldProblem", "Location", "declared_fields", "dotted_path", "locate", "union_arms", "value_at"]

Step = str | int


class FieldProblem(ValueError):
    """A value error about the key ``at`` (steps below the validated model), not the model as a whole."""

    def __init__(self, message: str, *at: Step) -> None:
        super().__init__(message)
        self.at = at


@dataclass(frozen=True)
class Location:
    """Where an error is: ``steps`` into the data, the type declared there (None for a key the schema
    does not have) and the type declared one step above (the mapping an unknown key was found in)."""

    steps: tuple[Step, ...]
    declared: Any
    parent: Any


def dotted_path(steps: tuple[Step, ...] | list[Step]) -> str:
    """``('data', 'streams', 0, 'weight')`` -> ``data.streams[0].weight``."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def value_at(data: Any, steps: tuple[Step, ...]) -> Any:
    """The value at `steps` in plain data; None where it is missing."""
    for step in steps:
        if isinstance(data, dict):
            data = data.get(step)
        elif isinstance(data, list | tuple) and isinstance(step, int) and 0 <= step < len(data):
            data = data[step]
        else:
            return None
    return data


def union_arms(tp: Any) -> tuple[Any, ...]:
    """The non-null members of a union type; () for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return ()


def _unwrap(tp: Any) -> Any:
    """Drop ``Annotated`` metadata and a union's null member (pydantic names no branch for ``X | None``)."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        arms = union_arms(tp)
        if len(arms) == 1:
            tp = arms[0]
            continue
        return tp


def declared_fields(tp: Any) -> dict[str, Any] | None:
    """Declared field types of a model or dataclass; None for other types."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):  # by the names data uses (pydantic's locs too)
        return {info.alias or name: info.annotation for name, info in tp.model_fields.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp, include_extras=True)
    return None


def _tagged_branch(arms: tuple[Any, ...], tag: Step) -> Any:
    """The member of a discriminated union that `tag` selects (a model whose Literal field holds it)."""
    for arm in arms:
        for annotation in (declared_fields(arm) or {}).values():
            if typing.get_origin(annotation) is Literal and tag in typing.get_args(annotation):
                return arm
    return None


def _step_into(tp: Any, step: Step) -> Any:
    """The type declared one key or index below `tp`; None for a key `tp` does not declare."""
    fields = declared_fields(tp)
    if fields is not None:
        return fields.get(step) if isinstance(step, str) else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        return args[0]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        return args[0]
    if origin is tuple and isinstance(step, int) and step < len(args):
        return args[step]
    if origin is dict and len(args) == 2:
        return args[1]
    return Any


def locate(error: ErrorDetails, root: Any) -> Location:
    """The data path and declared type of one of ``ValidationError.errors()``, validated as `root`.

    The walk stops at a plain union (``str | list[str]``): its branches' errors all mean "none of these
    types", so the union's path and type describe the error best."""
    steps: list[Step] = []
    declared, parent = root, None
    pending = list(error["loc"])
    if pending[-1:] == ["[key]"]:  # a mapping's key itself is wrong: point at the mapping
        pending = pending[:-2]
    while pending and declared is not None:
        declared = _unwrap(declared)
        arms = union_arms(declared)
        if arms:
            branch = _tagged_branch(arms, pending[0])
            if branch is None:
                break
            declared = branch
            pending.pop(0)
            continue
        step = pending.pop(0)
        steps.append(step)
        parent, declared = declared, _step_into(declared, step)
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldProblem):
        steps.extend(ctx_error.at)
    return Location(tuple(steps), None if declared is None else _unwrap(declared), parent)

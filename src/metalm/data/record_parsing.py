"""Parsing one JSON object into a record, and the errors that name the file, line and field it failed on.

A record's kind is its ``"kind"``, or inferred from its fields when it has none; its fields are checked by
its declaration (:mod:`metalm.data.record_kinds`). A pydantic error becomes a :class:`RecordError` in the
words of the JSONL format: ``data/train.jsonl:17: field 'content[1].type': unknown type 'video'; ...``.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from metalm.data.record_kinds import (
    KINDS,
    RECORD_KINDS,
    AudioPart,
    AudioText,
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    Record,
    TextDocument,
    TextPart,
    VQAExample,
    _json_type,
)
from metalm.schema import declared_fields, dotted_path, locate, union_arms, value_at

__all__ = ["RecordError", "SkipReport", "parse_record", "record_to_dict"]

_SKIP_HINT = "fix the record or pass --skip-bad to skip it"


class RecordError(ValueError):
    """A record is malformed. ``path``/``line`` (1-based) locate it, ``field`` names the bad field.

    ``str(err)`` reads like ``data/train.jsonl:17: field 'text': empty string — fix the record or
    pass --skip-bad to skip it``; ``reason`` is the bare message.
    """

    def __init__(
        self, reason: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self._format())

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep path/line/field across pickling (errors raised in DataLoader worker processes).
        return (_record_error, (self.reason, self.path, self.line, self.field))

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        what = f"field '{self.field}': " if self.field is not None else ""
        hint = f" — {_SKIP_HINT}" if self.path is not None else ""
        return f"{where}{what}{self.reason}{hint}"


def _record_error(reason: str, path: str | None, line: int | None, field: str | None) -> RecordError:
    return RecordError(reason, path=path, line=line, field=field)


@dataclass
class SkipReport:
    """Bad records skipped under ``skip_bad``: a total count and the first ``max_items`` of them."""

    count: int = 0
    items: list[tuple[str | None, int | None, str | None, str]] = field(default_factory=list)
    max_items: int = 1000

    def add(self, err: RecordError) -> None:
        self.count += 1
        if len(self.items) < self.max_items:
            self.items.append((err.path, err.line, err.field, err.reason))

    def summary(self, limit: int = 20) -> str:
        """Human-readable summary listing at most ``limit`` records."""
        if self.count == 0:
            return "no bad records"
        lines = [f"skipped {self.count} bad record{'s' if self.count != 1 else ''}:"]
        for path, line, fld, reason in self.items[:limit]:
            what = f"field '{fld}': " if fld is not None else ""
            lines.append(f"  {path}:{line}: {what}{reason}")
        if self.count > limit:
            lines.append(f"  ... and {self.count - min(limit, len(self.items))} more")
        return "\n".join(lines)


class _Invalid(Exception):
    """Internal: a validation failure before the file/line are attached."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


_RecordLine = Annotated[Record, Field(discriminator="kind")]
_LINES = TypeAdapter(_RecordLine)
_LINE_ONLY = frozenset(name for cls in RECORD_KINDS for name in cls.LINE_ONLY)
_COMMON = frozenset({"kind", "id", "meta"})
_ALL_FIELDS = frozenset().union(*(declared_fields(cls) for cls in RECORD_KINDS)) | _LINE_ONLY

# Kind inference when "kind" is absent: the set of data fields must match one of these exactly.
_INFER: dict[frozenset[str], str] = {
    frozenset({"text"}): "text",
    frozenset({"image", "text"}): "image_text",
    frozenset({"audio", "text"}): "audio_text",
    frozenset({"content"}): "interleaved",
    **{
        frozenset({"image", *asked, answer}): "vqa"
        for asked in (("question",), ("audio",), ("question", "audio"))
        for answer in ("answers", "answer")
    },
    **{
        frozenset({*given, "label"}): "classification" for given in (("text",), ("audio",), ("text", "audio"))
    },
}


def _with_kind(obj: Any) -> dict[str, Any]:
    """`obj` with its "kind", inferred from its fields when it has none."""
    if not isinstance(obj, dict):
        raise _Invalid(None, f"a record must be a JSON object, got {_json_type(obj)}")
    if "kind" in obj:
        return obj
    unknown = next((key for key in obj if key not in _ALL_FIELDS), None)
    if unknown is not None:
        raise _Invalid(unknown, "unknown field")
    data = frozenset(obj) - _COMMON
    if data not in _INFER:
        raise _Invalid(
            "kind",
            f"missing, and cannot be inferred from the fields {sorted(data)}; "
            f'add "kind": one of {", ".join(KINDS)}',
        )
    return {**obj, "kind": _INFER[data]}


def _json_type_name(tp: Any) -> str:
    """How a message names a declared type: ``a string``, ``a string or an integer``."""
    arms = union_arms(tp)
    if arms:
        return " or ".join(dict.fromkeys(_json_type_name(a) for a in arms))  # models are all "an object"
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        tuple: "an array",
    }
    return names.get(typing.get_origin(tp) or tp, "an object")


def _tags(union: Any, discriminator: str) -> list[str]:
    """The values a discriminated union's members declare for `discriminator`."""
    return [typing.get_args(declared_fields(arm)[discriminator])[0] for arm in union_arms(union)]


def _invalid(error: ErrorDetails, obj: dict[str, Any]) -> _Invalid:
    """One pydantic error as the field it names and the reason, in the words of this format."""
    where = locate(error, _RecordLine)
    field = dotted_path(where.steps) or None
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = ctx["discriminator"].strip("'")
        field = f"{field}.{discriminator}" if field else discriminator
        tags = ", ".join(_tags(where.declared, discriminator))
        if kind == "union_tag_not_found":
            return _Invalid(field, f"missing (one of {tags})")
        return _Invalid(field, f"unknown {discriminator} {ctx['tag']!r}; expected one of {tags}")
    if kind == "missing":
        return _Invalid(field, "missing")
    if kind == "extra_forbidden":
        declared = [*(declared_fields(where.parent) or ()), *getattr(where.parent, "LINE_ONLY", ())]
        allowed = ", ".join(sorted(declared))
        return _Invalid(field, f"unknown field for kind '{obj['kind']}' (allowed: {allowed})")
    if kind in ("value_error", "assertion_error"):
        return _Invalid(field, str(ctx["error"]))
    if kind == "string_unicode":
        return _Invalid(field, "contains an invalid lone surrogate")
    got = _json_type(value_at(obj, where.steps))
    return _Invalid(field, f"expected {_json_type_name(where.declared)}, got {got}")


def _parse(obj: Any, base_dir: Path | None, check_images: bool) -> Record:
    line = _with_kind(obj)
    try:
        # A line names its fields as the format does ("content", not the attribute "parts").
        return _LINES.validate_python(
            line, context={"base_dir": base_dir, "check_images": check_images}, by_alias=True, by_name=False
        )
    except ValidationError as err:
        raise _invalid(err.errors()[0], line) from None


def parse_record(
    obj: Any, *, base_dir: str | os.PathLike[str] | None = None, check_images: bool = False
) -> Record:
    """Validate one decoded JSON object and build its record.

    Relative image paths resolve against ``base_dir`` (default: the current directory). With
    ``check_images`` every image is also decoded with :func:`metalm.data.images.load_image`.

    Raises:
        RecordError: with ``field`` set to the offending field (``path``/``line`` unset).
    """
    try:
        return _parse(obj, Path(base_dir) if base_dir is not None else None, check_images)
    except _Invalid as exc:
        raise RecordError(exc.reason, field=exc.field) from None


def record_to_dict(record: Record, *, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The JSON object for ``record``; image paths under ``base_dir`` become relative to it."""
    root = os.path.abspath(base_dir) if base_dir is not None else None

    def img(ref: str) -> str:
        if root is not None and not ref[:5].lower() == "data:":
            rel = os.path.relpath(ref, root)
            if not rel.startswith(os.pardir + os.sep) and rel != os.pardir and not os.path.isabs(rel):
                return Path(rel).as_posix()
        return ref

    out: dict[str, Any] = {"kind": record.kind}
    if isinstance(record, TextDocument):
        out["text"] = record.text
    elif isinstance(record, ImageText):
        out.update(image=img(record.image), text=record.text)
    elif isinstance(record, AudioText):
        out.update(audio=img(record.audio), text=record.text)
    elif isinstance(record, Classification):
        out.update(text=record.text, label=record.label)
    elif isinstance(record, VQAExample):
        out.update(image=img(record.image), question=record.question, answers=list(record.answers))
    elif isinstance(record, Interleaved):
        out["content"] = [_part_dict(p, img) for p in record.parts]
    else:
        raise TypeError(f"not a record: {type(record).__name__}")
    if getattr(record, "audio", None) is not None and not isinstance(record, AudioText):
        out["audio"] = img(record.audio)
    # A spoken question or text without its transcript: the field is left out, not written as null.
    for key in ("question", "text"):
        if key in out and out[key] is None:
            del out[key]
    if record.id is not None:
        out["id"] = record.id
    return out


def _part_dict(part: TextPart | ImagePart | AudioPart, ref: Any) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, AudioPart):
        return {"type": "audio", "audio": ref(part.audio)}
    return {"type": "image", "image": ref(part.image)}

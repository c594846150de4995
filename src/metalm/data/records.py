"""Tokenizer-agnostic data records and the JSONL format that stores them.

One JSON object per line; a ``kind`` field says what the record is (see ``docs/data.md``)::

    {"kind": "text", "text": "..."}
    {"kind": "image_text", "image": "images/0.png", "text": "..."}
    {"kind": "audio_text", "audio": "clips/0.wav", "text": "..."}
    {"kind": "interleaved", "content": [{"type": "text", "text": "..."}, {"type": "image", "image": "..."},
                                        {"type": "audio", "audio": "..."}]}
    {"kind": "vqa", "image": "...", "question": "...", "answers": ["..."]}
    {"kind": "vqa", "image": "...", "audio": "question.wav", "answers": ["..."]}   (a spoken question)
    {"kind": "classification", "text": "...", "label": "..."}
    {"kind": "classification", "audio": "...", "label": "..."}                     (spoken text)

Records carry raw text and *unresolved* image and audio references (an absolute path, or a ``data:`` URL
kept verbatim); tokenization and decoding happen later, once per record, elsewhere.
:func:`read_jsonl` streams a file line by line and raises :class:`RecordError` naming the file,
line and field of the first bad record, or skips and counts bad records into a :class:`SkipReport`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
import typing
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from metalm.schema import FieldProblem, declared_fields, dotted_path, locate, union_arms, value_at

__all__ = [
    "KINDS",
    "MAX_LINE_BYTES",
    "AudioPart",
    "AudioText",
    "Classification",
    "ImagePart",
    "ImageText",
    "Interleaved",
    "Record",
    "RecordError",
    "SkipReport",
    "TextDocument",
    "TextPart",
    "VQAExample",
    "parse_record",
    "read_jsonl",
    "read_records",
    "record_to_dict",
    "validate_file",
    "write_jsonl",
]

# A line longer than this is rejected without being held in memory whole. 64 MiB leaves room for
# an inline data: URL of a 20 MB image (base64 adds a third) while bounding memory per line.
MAX_LINE_BYTES = 64 * 1024 * 1024

_SKIP_HINT = "fix the record or pass --skip-bad to skip it"


# --------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class TextDocument:
    """A plain text document (language-model pre-training)."""

    kind: ClassVar[str] = "text"
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ImageText:
    """An image with its caption / paired text. ``image`` is an absolute path or a ``data:`` URL."""

    kind: ClassVar[str] = "image_text"
    image: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text run inside an :class:`Interleaved` record."""

    type: ClassVar[str] = "text"
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image inside an :class:`Interleaved` record (absolute path or ``data:`` URL)."""

    type: ClassVar[str] = "image"
    image: str


@dataclass(frozen=True, slots=True)
class AudioPart:
    """Speech inside an :class:`Interleaved` record (absolute path or ``data:`` URL)."""

    type: ClassVar[str] = "audio"
    audio: str


@dataclass(frozen=True, slots=True)
class Interleaved:
    """Text, images and speech in reading order."""

    kind: ClassVar[str] = "interleaved"
    parts: tuple[TextPart | ImagePart | AudioPart, ...]
    id: str | None = None


@dataclass(frozen=True, slots=True)
class AudioText:
    """Speech with its transcript. ``audio`` is an absolute path or a ``data:`` URL."""

    kind: ClassVar[str] = "audio_text"
    audio: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class VQAExample:
    """A visual question with one or more reference answers (the first is the training target).
    With ``audio`` the question is spoken: the clip is what the model hears, and ``question`` (its
    transcript, when known; else None) is not shown to it."""

    kind: ClassVar[str] = "vqa"
    image: str
    question: str | None
    answers: tuple[str, ...]
    id: str | None = None
    audio: str | None = None


@dataclass(frozen=True, slots=True)
class Classification:
    """A text with a class label (the label is text the decoder writes, e.g. ``"sports"``). With
    ``audio`` the text is spoken and ``text`` is its transcript, when known (else None)."""

    kind: ClassVar[str] = "classification"
    text: str | None
    label: str
    id: str | None = None
    audio: str | None = None


Record = TextDocument | ImageText | AudioText | Interleaved | VQAExample | Classification

KINDS: dict[str, type] = {
    cls.kind: cls for cls in (TextDocument, ImageText, AudioText, Interleaved, VQAExample, Classification)
}

# --------------------------------------------------------------------------------------------
# Errors and skip reports


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


# --------------------------------------------------------------------------------------------
# The JSONL line schema: what one line may hold, a union discriminated by "kind"
#
# A line is not the record it becomes: it may give one "answer" or a list of "answers", an integer id,
# free-form "meta" and image paths relative to the file. `to_record` turns it into the record.


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON "\ud800" escapes decode to lone surrogates that no tokenizer can encode.
        raise ValueError(f"contains an invalid lone surrogate at character {exc.start}") from None
    return value


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_B64_ONLY = re.compile(r"^[A-Za-z0-9+/=\s]+$")


def _check_data_url(value: str, media: str = "image") -> None:
    example = "image/png" if media == "image" else "audio/wav"
    header, sep, payload = value.partition(",")
    if not sep:
        raise ValueError(f"malformed data URL (no comma); expected data:{example};base64,<data>")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if not params[0].startswith(f"{media}/"):
        raise ValueError(f"data URL media type {params[0]!r} is not {media}/*")
    if "base64" not in params[1:]:
        raise ValueError(f"only base64 data URLs are supported (data:{media}/<type>;base64,<data>)")
    payload = "".join(payload.split())
    if not payload:
        raise ValueError("data URL has no payload")
    # Same leniency as images.load_image: URL-safe alphabet and missing padding are accepted.
    payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"malformed base64 in data URL ({exc})") from None


def _local_image(value: str, base_dir: Path | None, media: str = "image") -> str:
    """The absolute path of an image (or audio) file named by `value` (relative to `base_dir`)."""
    path = Path(value)
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    ref = os.path.abspath(path)  # normalise ".." without resolving symlinks
    if not os.path.isfile(ref):
        hint = ""
        if len(value) > 100 and "." not in value and _B64_ONLY.match(value):
            example = "image/png" if media == "image" else "audio/wav"
            hint = f" (this looks like raw base64: prefix it with data:{example};base64,)"
        elif base_dir is not None and not Path(value).is_absolute():
            hint = " (relative paths are resolved against the JSONL file's folder)"
        raise ValueError(f"{media} file not found: {ref}{hint}")
    return ref


def _image(value: str, info: ValidationInfo) -> str:
    """Validate an image reference; returns an absolute path or the data URL unchanged. The validation
    context holds ``base_dir`` (relative paths) and ``check_images`` (decode every image)."""
    base_dir, check_images = info.context["base_dir"], info.context["check_images"]
    if not value.strip():
        raise ValueError("empty string")
    if value[:5].lower() == "data:":
        _check_data_url(value)
        ref = value
    elif _URL_SCHEME.match(value):
        raise ValueError(
            f"{value.split(':', 1)[0]}:// URLs are not fetched; download the image and give a local "
            "path or a data:image/...;base64 URL"
        )
    else:
        ref = _local_image(value, base_dir)
    if check_images:
        from metalm.data.images import ImageError, load_image  # lazy: pulls in torch

        try:
            load_image(ref, name="data URL" if ref is value else value)
        except ImageError as exc:
            raise ValueError(str(exc)) from None
    return ref


def _audio(value: str, info: ValidationInfo) -> str:
    """Validate an audio reference as `_image` does an image; ``check_images`` also decodes the clip."""
    base_dir, check = info.context["base_dir"], info.context["check_images"]
    if not value.strip():
        raise ValueError("empty string")
    if value[:5].lower() == "data:":
        _check_data_url(value, "audio")
        ref = value
    elif _URL_SCHEME.match(value):
        raise ValueError(
            f"{value.split(':', 1)[0]}:// URLs are not fetched; download the audio and give a local "
            "path or a data:audio/...;base64 URL"
        )
    else:
        ref = _local_image(value, base_dir, "audio")
    if check:
        from metalm.data.audio import AudioError, load_audio  # lazy: pulls in scipy

        try:
            load_audio(ref, name="data URL" if ref is value else value)
        except AudioError as exc:
            raise ValueError(str(exc)) from None
    return ref


Text = Annotated[str, AfterValidator(_text)]
ImageRef = Annotated[str, AfterValidator(_image)]
AudioRef = Annotated[str, AfterValidator(_audio)]


class _Strict(BaseModel):
    """JSON as written: unknown fields are errors and nothing is coerced (5 is no string)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _TextPartLine(_Strict):
    type: Literal["text"]
    text: Text

    def to_part(self) -> TextPart:
        return TextPart(self.text)


class _ImagePartLine(_Strict):
    type: Literal["image"]
    image: ImageRef

    def to_part(self) -> ImagePart:
        return ImagePart(self.image)


class _AudioPartLine(_Strict):
    type: Literal["audio"]
    audio: AudioRef

    def to_part(self) -> AudioPart:
        return AudioPart(self.audio)


class _Line(_Strict):
    """Fields every kind takes besides its own: an id (a number becomes its string) and free-form meta."""

    id: str | int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def record_id(self) -> str | None:
        return None if self.id is None else str(self.id)


class _TextLine(_Line):
    kind: Literal["text"]
    text: Text

    def to_record(self) -> TextDocument:
        return TextDocument(self.text, id=self.record_id)


class _ImageTextLine(_Line):
    kind: Literal["image_text"]
    image: ImageRef
    text: Text

    def to_record(self) -> ImageText:
        return ImageText(self.image, self.text, id=self.record_id)


class _AudioTextLine(_Line):
    kind: Literal["audio_text"]
    audio: AudioRef
    text: Text

    def to_record(self) -> AudioText:
        return AudioText(self.audio, self.text, id=self.record_id)


class _InterleavedLine(_Line):
    kind: Literal["interleaved"]
    content: list[Annotated[_TextPartLine | _ImagePartLine | _AudioPartLine, Field(discriminator="type")]]

    @field_validator("content")
    @classmethod
    def _not_empty(cls, content: list[Any]) -> list[Any]:
        if not content:
            raise ValueError("empty array")
        return content

    def to_record(self) -> Interleaved:
        return Interleaved(tuple(part.to_part() for part in self.content), id=self.record_id)


class _VQALine(_Line):
    """The answers: a list in "answers", or one string in "answer". A spoken question ("audio") may come
    without its transcript ("question")."""

    kind: Literal["vqa"]
    image: ImageRef
    question: Text | None = None
    audio: AudioRef | None = None
    answers: list[Text] | None = None
    answer: Text | None = None

    @field_validator("answers")
    @classmethod
    def _some_answer(cls, answers: list[str] | None) -> list[str] | None:
        if answers is not None and not answers:
            raise ValueError("empty array; give at least one answer")
        return answers

    @model_validator(mode="after")
    def _answers_or_answer(self) -> _VQALine:
        if self.answers is not None and self.answer is not None:
            raise FieldProblem("give either 'answers' (list) or 'answer' (string), not both", "answer")
        if self.answers is None and self.answer is None:
            raise FieldProblem("missing", "answers")
        if self.question is None and self.audio is None:
            raise FieldProblem("missing (or give the question spoken, in 'audio')", "question")
        return self

    def to_record(self) -> VQAExample:
        answers = tuple(self.answers) if self.answers is not None else (self.answer,)
        return VQAExample(self.image, self.question, answers, id=self.record_id, audio=self.audio)


class _ClassificationLine(_Line):
    """A text, or a spoken one ("audio", with "text" its transcript when known), and its label."""

    kind: Literal["classification"]
    text: Text | None = None
    audio: AudioRef | None = None
    label: Text

    @model_validator(mode="after")
    def _text_or_audio(self) -> _ClassificationLine:
        if self.text is None and self.audio is None:
            raise FieldProblem("missing (or give the text spoken, in 'audio')", "text")
        return self

    def to_record(self) -> Classification:
        return Classification(self.text, self.label, id=self.record_id, audio=self.audio)


_RecordLine = Annotated[
    _TextLine | _ImageTextLine | _AudioTextLine | _InterleavedLine | _VQALine | _ClassificationLine,
    Field(discriminator="kind"),
]
_LINES = TypeAdapter(_RecordLine)
_COMMON = frozenset(_Line.model_fields) | {"kind"}
_ALL_FIELDS = frozenset().union(*(arm.model_fields for arm in union_arms(typing.get_args(_RecordLine)[0])))

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
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array"}
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
        allowed = ", ".join(sorted(declared_fields(where.parent) or ()))
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
        parsed = _LINES.validate_python(line, context={"base_dir": base_dir, "check_images": check_images})
    except ValidationError as err:
        raise _invalid(err.errors()[0], line) from None
    return parsed.to_record()


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


# --------------------------------------------------------------------------------------------
# Reading and writing JSONL


class _DuplicateKey(Exception):
    pass


class _HugeInt(str):
    """An integer literal over Python's int-string conversion limit (``sys.get_int_max_str_digits``):
    json.loads would raise a bare ValueError; kept as a marker so the field holding it can be named."""


def _parse_int(text: str) -> int | _HugeInt:
    try:
        return int(text)
    except ValueError:
        return _HugeInt(text)


def _huge_int(value: Any) -> str | None:
    """Why `value` (a JSON value, its objects already checked) holds a _HugeInt, or None."""
    if isinstance(value, list):
        return next((r for r in map(_huge_int, value) if r), None)
    if isinstance(value, _HugeInt):
        limit = sys.get_int_max_str_digits()
        return f"integer of {len(value.lstrip('-'))} digits is too long (Python reads at most {limit})"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; a repeated "text" is almost always a bug.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        huge = _huge_int(value)
        if huge:
            raise _Invalid(key, huge)
        out[key] = value
    return out


def _decode_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(
            None,
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); re-encode the file as UTF-8",
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise _Invalid(None, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise _Invalid(None, "invalid JSON: nested too deeply") from None
    except _DuplicateKey as exc:
        raise _Invalid(str(exc), "appears more than once in the object") from None
    huge = _huge_int(value)  # a bare number or list at the top level (in an object, the hook names it)
    if huge:
        raise _Invalid(None, huge)
    return value


def _lines(fh: Any, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) per line; ``None`` for a line over ``max_line_bytes``."""
    lineno = 0
    while True:
        raw = fh.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while True:  # drain the rest of the oversize line without holding it
                chunk = fh.readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield lineno, None
            continue
        yield lineno, raw


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_images: bool = False,
    report: SkipReport | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    """Stream the records of a JSONL file, one line at a time (files may exceed memory). With `origins`,
    each yielded record's (file, 1-based line) is appended to it, so later errors can name them.

    Blank lines are skipped. A bad record raises :class:`RecordError` (file, 1-based line, field);
    with ``skip_bad`` it is counted into ``report`` instead. Bad records are never dropped
    silently: with ``skip_bad`` and no ``report``, a warning with the summary is issued at the end.
    Relative image paths resolve against the file's folder.
    """
    shown = os.fspath(path)
    base_dir = Path(os.path.abspath(path)).parent
    own_report = report is None and skip_bad
    rep = report if report is not None else SkipReport()
    with open(path, "rb") as fh:
        for lineno, raw in _lines(fh, max_line_bytes):
            try:
                if raw is None:
                    raise _Invalid(None, f"line longer than {max_line_bytes:,} bytes")
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # tolerate a UTF-8 byte-order mark written by some editors
                if not raw.strip():
                    continue
                record = _parse(_decode_line(raw), base_dir, check_images)
            except _Invalid as exc:
                err = RecordError(exc.reason, path=shown, line=lineno, field=exc.field)
                if not skip_bad:
                    raise err from None
                rep.add(err)
                continue
            if origins is not None:
                origins.append((shown, lineno))
            yield record
    if own_report and rep.count:
        warnings.warn(rep.summary(), stacklevel=2)


def _is_hf_dataset_dir(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_hf(
    folder: Path,
    skip_bad: bool,
    check_images: bool,
    report: SkipReport,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise ValueError(
            f"{folder} is a Hugging Face datasets folder, but the 'datasets' package is not installed; "
            "install it, or export the rows to JSONL"
        ) from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(
            f"{folder} holds a DatasetDict (splits: {', '.join(ds)}); pass the folder of one split, "
            f"e.g. {folder / next(iter(ds))}"
        )
    for i, row in enumerate(ds):
        try:
            # Columns a row does not use come back as None in a mixed-kind table.
            obj = {k: v for k, v in row.items() if v is not None}
            record = _parse(obj, folder, check_images)
        except _Invalid as exc:
            err = RecordError(exc.reason, path=f"{folder}[row {i}]", line=None, field=exc.field)
            if not skip_bad:
                raise err from None
            report.add(err)
            continue
        if origins is not None:
            origins.append((f"{folder}[row {i}]", None))
        yield record


def read_records(
    source: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    check_images: bool = False,
    report: SkipReport | None = None,
    origins: list[tuple[str, int | None]] | None = None,
) -> Iterator[Record]:
    """Stream records from a ``.jsonl`` file, a folder of ``.jsonl`` files (sorted by name), or a
    Hugging Face ``datasets`` folder written by ``save_to_disk`` (needs ``datasets`` installed).
    Error handling and `origins` as in :func:`read_jsonl`."""
    src = Path(source)
    own_report = report is None and skip_bad
    rep = report if report is not None else SkipReport()
    if src.is_dir():
        if _is_hf_dataset_dir(src):
            yield from _read_hf(src, skip_bad, check_images, rep, origins)
        else:
            files = sorted(p for p in src.iterdir() if p.suffix == ".jsonl" and p.is_file())
            if not files:
                raise FileNotFoundError(f"{src}: no .jsonl files in this folder")
            for file in files:
                yield from read_jsonl(
                    file, skip_bad=skip_bad, check_images=check_images, report=rep, origins=origins
                )
    elif src.is_file():
        yield from read_jsonl(src, skip_bad=skip_bad, check_images=check_images, report=rep, origins=origins)
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    if own_report and rep.count:
        warnings.warn(rep.summary(), stacklevel=2)


def validate_file(
    path: str | os.PathLike[str], skip_bad: bool = False, check_images: bool = False
) -> tuple[int, SkipReport]:
    """Read every record of ``path`` (file or folder, as :func:`read_records`).

    Returns (number of good records, report of skipped ones). Without ``skip_bad`` the first bad
    record raises :class:`RecordError`.
    """
    report = SkipReport()
    n_ok = 0
    for _ in read_records(path, skip_bad=skip_bad, check_images=check_images, report=report):
        n_ok += 1
    return n_ok, report


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Write records as JSONL (the inverse of :func:`read_jsonl`); returns the number written.

    Image paths under the output file's folder are stored relative to it, others absolute, so a
    folder holding the JSONL and its images can be moved as a whole. The file is written to a
    temporary name and renamed, so an interrupted write never leaves a truncated file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_dir = out.parent
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(json.dumps(record_to_dict(record, base_dir=base_dir), ensure_ascii=False))
                fh.write("\n")
                n += 1
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n

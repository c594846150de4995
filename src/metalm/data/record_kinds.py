"""The record kinds, each declared once: a pydantic model that parses a JSONL line and is the in-memory record.

Fields are checked as JSON is written (``strict``: 5 is no string) and unknown fields are errors. A record
read from a file is also checked for what a file can get wrong -- empty text, an image or clip that is not
there, a malformed ``data:`` URL -- and its relative paths are resolved; those checks need the file's
folder, which the reader passes as the validation context (``base_dir``, ``check_images``). A record built
in code (``TextDocument("hello")``, fields also positional in declared order) is checked for types only.

A line may say a little more than its record holds: a number ``id`` (kept as its string), free-form ``meta``
(dropped; ``metalm eval --data`` reads it from the line), one ``"answer"`` instead of a list of
``"answers"``, and an interleaved record's parts under ``"content"``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from metalm.schema import FieldProblem

__all__ = [
    "KINDS",
    "AudioPart",
    "AudioText",
    "Classification",
    "ImagePart",
    "ImageText",
    "Interleaved",
    "Record",
    "TextDocument",
    "TextPart",
    "VQAExample",
]


# --------------------------------------------------------------------------------------------
# Field checks of a record read from a file


def _from_file(info: ValidationInfo) -> bool:
    """Whether the record is being read from a file (the reader passes its folder as the context)."""
    return info.context is not None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _text(value: str, info: ValidationInfo) -> str:
    if not _from_file(info):
        return value
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


def _media_ref(value: str | bytes, info: ValidationInfo, media: str) -> str | bytes:
    """An image (or audio) reference read from a file: an absolute path or the data URL unchanged. The
    validation context holds ``base_dir`` (relative paths) and ``check_images`` (decode every image/clip).
    Encoded bytes (a streamed shard's ``jpg`` member) come only from code, never from a JSON line."""
    if not _from_file(info) or isinstance(value, bytes):
        return value
    if not value.strip():
        raise ValueError("empty string")
    if value[:5].lower() == "data:":
        _check_data_url(value, media)
        ref = value
    elif _URL_SCHEME.match(value):
        raise ValueError(
            f"{value.split(':', 1)[0]}:// URLs are not fetched; download the {media} and give a local "
            f"path or a data:{media}/...;base64 URL"
        )
    else:
        ref = _local_image(value, info.context["base_dir"], media)
    if info.context["check_images"]:
        _decode(ref, name="data URL" if ref is value else value, media=media)
    return ref


def _decode(ref: str, *, name: str, media: str) -> None:
    """Decode an image or clip, its error as the field's (lazy imports: torch, scipy)."""
    if media == "image":
        from metalm.data.images import ImageError as Error
        from metalm.data.images import load_image as load
    else:
        from metalm.data.audio import AudioError as Error
        from metalm.data.audio import load_audio as load
    try:
        load(ref, name=name)
    except Error as exc:
        raise ValueError(str(exc)) from None


def _image(value: str | bytes, info: ValidationInfo) -> str | bytes:
    return _media_ref(value, info, "image")


def _audio(value: str | bytes, info: ValidationInfo) -> str | bytes:
    return _media_ref(value, info, "audio")


def _record_id(value: Any) -> Any:
    """A line's id: a string, or a number kept as its string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string or an integer, got {_json_type(value)}")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # a JSON array, or a list built in code


def _not_empty(value: tuple[Any, ...], info: ValidationInfo) -> tuple[Any, ...]:
    if _from_file(info) and not value:
        raise ValueError("empty array")
    return value


Text = Annotated[str, AfterValidator(_text)]
ImageRef = Annotated[str | bytes, AfterValidator(_image)]
AudioRef = Annotated[str | bytes, AfterValidator(_audio)]
RecordId = Annotated[str | None, BeforeValidator(_record_id)]


# --------------------------------------------------------------------------------------------
# Records


class _Declared(BaseModel):
    """A record or a part: frozen, strict, unknown fields are errors. Fields may be given positionally, in
    declared order, the ``kind`` / ``type`` tag left out (it has its one value)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_by_name=True, validate_by_alias=True
    )

    def __init__(self, /, *args: Any, **data: Any) -> None:
        if args:
            names = [name for name in type(self).model_fields if name not in ("kind", "type")]
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional fields")
            for name, value in zip(names, args):
                if name in data:
                    raise TypeError(f"{type(self).__name__}: field {name!r} given twice")
                data[name] = value
        super().__init__(**data)

    # Reading a line validates without calling __init__ (so the reader's context reaches the field checks):
    # this marks the positional convenience as pydantic's own __init__, not a custom one to route through.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


class _Record(_Declared):
    """What every kind takes besides its own fields: an ``id`` (a number in a line becomes its string) and,
    in a line only, free-form ``meta``."""

    LINE_ONLY: ClassVar[tuple[str, ...]] = ("meta",)  # line fields the record does not keep

    @model_validator(mode="before")
    @classmethod
    def _drop_meta(cls, data: Any) -> Any:
        if isinstance(data, dict) and "meta" in data:
            if not isinstance(data["meta"], dict):
                raise FieldProblem(f"expected an object, got {_json_type(data['meta'])}", "meta")
            data = {key: value for key, value in data.items() if key != "meta"}
        return data


class TextDocument(_Record):
    """A plain text document (language-model pre-training)."""

    kind: Literal["text"] = "text"
    text: Text
    id: RecordId = None


class ImageText(_Record):
    """An image with its caption / paired text. ``image`` is an absolute path or a ``data:`` URL (or, from
    a streamed shard, the encoded image's bytes)."""

    kind: Literal["image_text"] = "image_text"
    image: ImageRef
    text: Text
    id: RecordId = None


class TextPart(_Declared):
    """A text run inside an :class:`Interleaved` record."""

    type: Literal["text"] = "text"
    text: Text


class ImagePart(_Declared):
    """An image inside an :class:`Interleaved` record (absolute path or ``data:`` URL)."""

    type: Literal["image"] = "image"
    image: ImageRef


class AudioPart(_Declared):
    """Speech inside an :class:`Interleaved` record (absolute path or ``data:`` URL)."""

    type: Literal["audio"] = "audio"
    audio: AudioRef


Part = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Interleaved(_Record):
    """Text, images and speech in reading order (a line's ``"content"``)."""

    kind: Literal["interleaved"] = "interleaved"
    parts: Annotated[tuple[Part, ...], BeforeValidator(_as_tuple), AfterValidator(_not_empty)] = Field(
        alias="content"
    )
    id: RecordId = None


class AudioText(_Record):
    """Speech with its transcript. ``audio`` is an absolute path or a ``data:`` URL."""

    kind: Literal["audio_text"] = "audio_text"
    audio: AudioRef
    text: Text
    id: RecordId = None


class VQAExample(_Record):
    """A visual question with one or more reference answers (the first is the training target).
    With ``audio`` the question is spoken: the clip is what the model hears, and ``question`` (its
    transcript, when known; else None) is not shown to it. A line may give one ``"answer"`` instead."""

    LINE_ONLY: ClassVar[tuple[str, ...]] = ("meta", "answer")

    kind: Literal["vqa"] = "vqa"
    image: ImageRef
    question: Text | None = None
    answers: Annotated[tuple[Text, ...], BeforeValidator(_as_tuple)]
    id: RecordId = None
    audio: AudioRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_answer(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "answer" not in data:
            return data
        if "answers" in data:
            raise FieldProblem("give either 'answers' (list) or 'answer' (string), not both", "answer")
        answer = data["answer"]
        if not isinstance(answer, str):
            raise FieldProblem(f"expected a string, got {_json_type(answer)}", "answer")
        return {**{k: v for k, v in data.items() if k != "answer"}, "answers": [answer]}

    @field_validator("answers")
    @classmethod
    def _some_answer(cls, answers: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if _from_file(info) and not answers:
            raise ValueError("empty array; give at least one answer")
        return answers

    @model_validator(mode="after")
    def _question_or_audio(self) -> VQAExample:
        if self.question is None and self.audio is None:
            raise FieldProblem("missing (or give the question spoken, in 'audio')", "question")
        return self


class Classification(_Record):
    """A text with a class label (the label is text the decoder writes, e.g. ``"sports"``). With
    ``audio`` the text is spoken and ``text`` is its transcript, when known (else None)."""

    kind: Literal["classification"] = "classification"
    text: Text | None = None
    label: Text
    id: RecordId = None
    audio: AudioRef | None = None

    @model_validator(mode="after")
    def _text_or_audio(self) -> Classification:
        if self.text is None and self.audio is None:
            raise FieldProblem("missing (or give the text spoken, in 'audio')", "text")
        return self


Record = TextDocument | ImageText | AudioText | Interleaved | VQAExample | Classification
RECORD_KINDS: tuple[type[_Record], ...] = (
    TextDocument,
    ImageText,
    AudioText,
    Interleaved,
    VQAExample,
    Classification,
)
KINDS: dict[str, type[_Record]] = {cls.model_fields["kind"].default: cls for cls in RECORD_KINDS}

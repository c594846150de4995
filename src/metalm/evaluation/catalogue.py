"""The built-in evaluation tasks, read from a data table: ``configs/tasks/<family>.yaml``.

Each table entry names its task and gives

* ``examples``: which *reader* turns which built-in data set (:func:`metalm.data.builtin.load_builtin`)
  into :class:`~metalm.evaluation.protocol.Example` s -- ``vqa``, ``caption`` (the record's text is the answer
  for its image or clip), ``classification`` or ``fastbind`` (:mod:`metalm.evaluation.fastbind`);
* ``episodes`` (optional): a named episode hook (``fastbind``) for tasks whose demonstrations depend on the
  query;
* any :class:`~metalm.evaluation.protocol.Task` setting (``input_template``, ``scoring``, ``metric`` ...);
  the ones left out keep the Task defaults. ``layout`` (or ``layout_defaults``, which fills without making
  the task follow a model's saved layout) takes ``input_template`` / ``decoder_prompt`` from
  :data:`metalm.data.layouts.DEFAULT_LAYOUTS` when the entry does not give them.

A family file may hold ``defaults`` that every entry below takes unless it sets the key itself. The table is
validated by pydantic when first read; an error names the file, the task and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from metalm.data.layouts import DEFAULT_LAYOUTS
from metalm.evaluation.protocol import Example, Task, TaskError
from metalm.schema import dotted_path

__all__ = ["BUILTIN_TASKS", "CATALOGUE_DIR", "FAMILIES", "BuiltinTaskSpec", "builtin_task", "catalogue"]

CATALOGUE_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
# The family files, in the order their tasks are listed (`metalm eval --help`, BUILTIN_TASKS).
FAMILIES: tuple[str, ...] = ("image", "fastbind", "speech", "text")

_CONFIG = ConfigDict(extra="forbid", frozen=True)
LayoutName = Literal["vqa", "caption", "classification"]


# --------------------------------------------------------------------------------------------
# Readers: a built-in data set's records as examples


class _BuiltinRecords(BaseModel):
    """Records of one built-in data set (``kind``: another record kind of it, as a training stream's).
    ``id_prefix``: a record without an id becomes ``<id_prefix>/<split>/<index>`` (None: its id is kept,
    None included)."""

    model_config = _CONFIG

    dataset: str
    kind: str | None = None
    id_prefix: str | None = None

    def _records(self, split: str) -> list[tuple[str | None, Any]]:
        from metalm.data.builtin import load_builtin

        records = load_builtin(self.dataset, split, kind=self.kind)
        if self.id_prefix is None:
            return [(r.id, r) for r in records]
        return [(r.id or f"{self.id_prefix}/{split}/{i}", r) for i, r in enumerate(records)]


class VQAReader(_BuiltinRecords):
    """VQA records: the question (``{question}``), the answers and the image; ``spoken``: the question is
    also heard, from the record's clip. ``group: question_type``: each example's group is its easy-VQA
    question type (colour, shape, yes/no; read from its answers), so that results are given per type and
    ``--per-group`` can balance them."""

    reader: Literal["vqa"]
    spoken: bool = False
    group: Literal["question_type"] | None = None

    def examples(self, split: str, options: tuple[str, ...] | None) -> list[Example]:
        from metalm.evaluation.breakdown import question_type

        return [
            Example(
                id=rid,
                fields={"question": r.question},
                answers=tuple(r.answers),
                image=r.image,
                audio=r.audio if self.spoken else None,
                group=question_type(r.answers) if self.group else None,
            )
            for rid, r in self._records(split)
        ]


class CaptionReader(_BuiltinRecords):
    """Image-text or audio-text records: the text is the one answer for the image (or the clip)."""

    reader: Literal["caption"]
    media: Literal["image", "audio"] = "image"

    def examples(self, split: str, options: tuple[str, ...] | None) -> list[Example]:
        return [
            Example(id=rid, fields={}, answers=(r.text,), **{self.media: getattr(r, self.media)})
            for rid, r in self._records(split)
        ]


class ClassificationReader(_BuiltinRecords):
    """Classification records: ``{text}`` (whitespace collapsed) and ``{options}``, the task's options
    joined as an instruction stream joins them (metalm.training.config.OPTIONS_JOINER); the label."""

    reader: Literal["classification"]

    def examples(self, split: str, options: tuple[str, ...] | None) -> list[Example]:
        joined = ", ".join(options or ())
        return [
            Example(id=rid, fields={"text": " ".join(r.text.split()), "options": joined}, answers=(r.label,))
            for rid, r in self._records(split)
        ]


class FastbindReader(BaseModel):
    """easy-VQA images labelled by one attribute (:func:`metalm.evaluation.fastbind.labelled_images`)."""

    model_config = _CONFIG

    reader: Literal["fastbind"]
    attribute: Literal["shape", "color"]
    as_text: bool = False  # each image replaced by its caption (the decoder's own binding, no perception)

    def examples(self, split: str, options: tuple[str, ...] | None) -> list[Example]:
        from metalm.evaluation.fastbind import labelled_images

        return labelled_images(split, self.attribute, as_text=self.as_text)


Reader = Annotated[
    VQAReader | CaptionReader | ClassificationReader | FastbindReader, Field(discriminator="reader")
]


class FastbindEpisodes(BaseModel):
    """The fast-binding episode hook (:func:`metalm.evaluation.fastbind.episodes_for`). Episodes are drawn
    per task name, or per ``same_as``'s: a twin scored another way asks the very same episodes. ``ask``: the
    query is asked that attribute instead (its real value the answer) after the same demonstrations."""

    model_config = _CONFIG

    hook: Literal["fastbind"]
    ways: int = Field(ge=2)
    made_up: bool = True
    same_as: str | None = None
    ask: Literal["shape", "color"] | None = None

    def make(self, task_name: str) -> Callable[[Example, list[Example], int, int, int], Any]:
        from metalm.evaluation.fastbind import episodes_for

        return episodes_for(self.same_as or task_name, self.ways, made_up=self.made_up, ask=self.ask)


# --------------------------------------------------------------------------------------------
# A table entry

# Task fields that are not settings: the entry's key is the name, `examples` and `episodes` make the rest.
_NOT_SETTINGS = ("name", "load", "episodes")


def _task_settings() -> type[BaseModel]:
    """The Task settings an entry may give, declared by :class:`Task` itself: each of its init fields but
    those above, optional (an unset one keeps the Task default)."""
    hints = typing.get_type_hints(Task)
    fields: dict[str, Any] = {
        f.name: (hints[f.name] | None, None)
        for f in dataclasses.fields(Task)
        if f.init and f.name not in _NOT_SETTINGS and not f.name.startswith("_")
    }
    return create_model("TaskSettings", __config__=_CONFIG, **fields)


class BuiltinTaskSpec(_task_settings()):  # type: ignore[misc]
    """One row of the catalogue (see the module docstring)."""

    examples: Reader
    episodes: FastbindEpisodes | None = None
    layout_defaults: LayoutName | None = None

    @model_validator(mode="after")
    def _has_input(self) -> BuiltinTaskSpec:
        if self.input_template is None and self.layout is None and self.layout_defaults is None:
            raise ValueError("give input_template, or a layout whose template it takes")
        return self

    def build(self, name: str) -> Task:
        """A fresh :class:`Task` named `name`."""
        settings = self.model_dump(exclude_unset=True, exclude={"examples", "episodes", "layout_defaults"})
        layout_name = self.layout_defaults or self.layout
        if layout_name is not None:
            layout = getattr(DEFAULT_LAYOUTS, layout_name)
            settings.setdefault("input_template", layout.template)
            settings.setdefault("decoder_prompt", layout.prompt)
        reader, options = self.examples, self.options
        return Task(
            name=name,
            load=lambda split: reader.examples(split, options),
            episodes=self.episodes.make(name) if self.episodes is not None else None,
            **settings,
        )


class _Family(BaseModel):
    model_config = _CONFIG

    defaults: dict[str, Any] = Field(default_factory=dict)
    tasks: dict[str, dict[str, Any]]


def _read_family(path: Path) -> dict[str, BuiltinTaskSpec]:
    where = f"{path}"
    try:
        family = _Family.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as err:
        raise TaskError(_message(where, err)) from None
    specs = {}
    for name, entry in family.tasks.items():
        try:
            specs[name] = BuiltinTaskSpec.model_validate({**family.defaults, **entry})
            specs[name].build(name)  # the Task's own checks (metric, scoring, templates), nothing loaded yet
        except ValidationError as err:
            raise TaskError(_message(f"{where}: task {name!r}", err)) from None
        except TaskError as err:
            raise TaskError(f"{where}: {err}") from None
    return specs


def _message(where: str, err: ValidationError) -> str:
    first = err.errors()[0]
    steps = [step for step in first["loc"] if step not in ("vqa", "caption", "classification", "fastbind")]
    return f"{where}: {dotted_path(steps) or 'entry'}: {first['msg']}"


@functools.cache
def catalogue() -> dict[str, BuiltinTaskSpec]:
    """Every built-in task's table entry by name, in family order (read once)."""
    out: dict[str, BuiltinTaskSpec] = {}
    for family in FAMILIES:
        for name, spec in _read_family(CATALOGUE_DIR / f"{family}.yaml").items():
            if name in out:
                raise TaskError(f"{CATALOGUE_DIR / family}.yaml: task {name!r} is already in the catalogue")
            out[name] = spec
    return out


BUILTIN_TASKS: tuple[str, ...] = tuple(catalogue())


def builtin_task(name: str) -> Task:
    """A fresh built-in task by name (see :data:`BUILTIN_TASKS`)."""
    specs = catalogue()
    if name not in specs:
        raise TaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(specs)} (or give a .yaml/.json task file)"
        )
    return specs[name].build(name)

"""User tasks: a JSONL data file and a small YAML/JSON task file naming its fields (``docs/evaluation.md``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalm.evaluation.protocol import Example, Task, TaskError

__all__ = ["load_task_file"]

_TASK_KEYS = {
    "name", "data", "train", "input", "fewshot_input", "label", "options", "scoring", "normalization",
    "metric", "image", "id", "target", "target_delimiter", "decoder_prompt", "fewshot_decoder_prompt", "max_new_tokens", "stop", "truncate_field",
    "truncate_words", "caption_tokenizer", "description",
}  # fmt: skip


def _read_rows(path: Path, task: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TaskError(f"task {task!r}: data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object per line")
            rows.append((n, row))
    if not rows:
        raise TaskError(f"task {task!r}: {path} has no records")
    return rows


def _as_answers(value: Any, options: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, int) and options is not None:  # an index into the options (lm-eval style)
        if not 0 <= value < len(options):
            raise TaskError(f"{where}: label index {value} is out of range for {len(options)} options")
        return (str(options[value]),)
    if isinstance(value, str | int | float):
        return (str(value),)
    if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise TaskError(
        f"{where}: label must be a string, a number or a non-empty list of strings, got {value!r:.80}"
    )


def _read_task_spec(path: Path) -> dict[str, Any]:
    """The task file's mapping, checked for unknown and missing keys."""
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    raw_text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        spec = json.loads(raw_text)
    else:
        import yaml

        spec = yaml.safe_load(raw_text)
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task file must hold a mapping")
    unknown = set(spec) - _TASK_KEYS
    if unknown:
        raise TaskError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}")
    for key in ("data", "label"):
        if key not in spec:
            raise TaskError(f"{path}: missing required key {key!r}")
    if "input" not in spec and "image" not in spec:
        raise TaskError(f"{path}: give an 'input' template (and/or an 'image' field)")
    return spec


@dataclass(frozen=True)
class _RowReader:
    """Turns the rows of a task's data files into examples (fields named by the task file)."""

    name: str
    label_field: str
    image_field: str | None
    id_field: str
    options: tuple[str, ...] | None  # the task's own options
    options_field: str | None  # or a field holding each row's options

    def example(self, row: dict[str, Any], n: int, file: Path) -> Example:
        where = f"{file}:{n}"
        if self.label_field not in row:
            raise TaskError(f"{where}: label field {self.label_field!r} missing")
        options = None
        if self.options_field is not None:
            value = row.get(self.options_field)
            if not isinstance(value, list) or not value:
                raise TaskError(f"{where}: options field {self.options_field!r} must be a non-empty list")
            options = tuple(str(o) for o in value)
        answers = _as_answers(row[self.label_field], options or self.options, where)
        image = None
        if self.image_field:
            if not isinstance(row.get(self.image_field), str):
                raise TaskError(f"{where}: image field {self.image_field!r} missing or not a string")
            image = row[self.image_field]
            if not image.startswith("data:") and not Path(image).is_absolute():
                image = str((file.parent / image).resolve())
        rid = row.get(self.id_field, f"{self.name}/{file.stem}/{n}")
        return Example(id=str(rid), fields=row, answers=answers, options=options, image=image)


# Task-file key -> Task field, for the settings that pass through unchanged.
_PASSED_THROUGH = (
    ("normalization", "normalization"),
    ("max_new_tokens", "max_new_tokens"),
    ("truncate_field", "truncate_field"),
    ("truncate_words", "truncate_words"),
    ("caption_tokenizer", "caption_tokenizer"),
    ("description", "description"),
    ("target_delimiter", "target_delimiter"),
    ("fewshot_input", "fewshot_input_template"),
    ("decoder_prompt", "decoder_prompt"),
    ("fewshot_decoder_prompt", "fewshot_decoder_prompt"),
    ("target", "target_template"),
)


def load_task_file(path: str | Path) -> Task:
    """A user task from a YAML or JSON task file (keys documented in ``docs/evaluation.md``).

    Relative ``data`` / ``train`` paths and image paths in the records are resolved against the task file's
    folder (images: against the data file's folder)."""
    path = Path(path)
    spec = _read_task_spec(path)
    name = str(spec.get("name") or path.stem)
    base = path.resolve().parent
    data = (base / spec["data"]).resolve()
    train = (base / spec["train"]).resolve() if spec.get("train") else None
    options_spec = spec.get("options")
    if options_spec is not None and not isinstance(options_spec, list | str):
        raise TaskError(f"{path}: 'options' must be a list of labels or the name of a field holding them")
    task_options = tuple(str(o) for o in options_spec) if isinstance(options_spec, list) else None
    reader = _RowReader(
        name=name,
        label_field=str(spec["label"]),
        image_field=spec.get("image"),
        id_field=spec.get("id", "id"),
        options=task_options,
        options_field=options_spec if isinstance(options_spec, str) else None,
    )
    scoring = spec.get("scoring") or ("rank" if options_spec is not None else "generate")
    metric = spec.get("metric") or ("accuracy" if scoring == "rank" else "exact_match")

    def load(split: str) -> list[Example]:
        file = train if split == "train" else data
        if file is None:
            raise TaskError(f"task {name!r}: no 'train' file")
        return [reader.example(row, n, file) for n, row in _read_rows(file, name)]

    kwargs: dict[str, Any] = {attr: spec[key] for key, attr in _PASSED_THROUGH if key in spec}
    if "stop" in spec:
        stop = spec["stop"]
        kwargs["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Task(
        name=name,
        load=load,
        input_template=str(spec.get("input", "")),
        scoring=scoring,
        metric=metric,
        options=task_options,
        eval_split="test",
        demo_split="train" if train is not None else None,
        **kwargs,
    )

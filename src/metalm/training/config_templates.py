"""Instruction templates and request layouts of a training config: the placeholders each record kind's
template may use, the defaults, the checks of a stream's format settings, and the layouts a trained model
records for its requests (:mod:`metalm.data.layouts`)."""

from __future__ import annotations

import functools
import string
from typing import TYPE_CHECKING, Any

from metalm.data.layouts import CAPTION_INSTRUCTION, DEFAULT_LAYOUTS
from metalm.schema import FieldProblem

if TYPE_CHECKING:
    from metalm.training.config_schema import StreamConfig

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TEMPLATES",
    "OPTIONS_JOINER",
    "TEMPLATE_FIELDS",
    "TEMPLATE_REQUIRED",
    "check_stream_format",
    "check_template",
    "layouts_from_streams",
    "stream_record_kind",
]

# Instruction samples (`format: instruction`; VQA records always): the placeholders a template may use per
# record kind, the one it must use, and the defaults. A classification record's `{options}` is the
# stream's labels joined with OPTIONS_JOINER (FLAN writes the options into the input).
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "classification": ("text", "options"),
    "vqa": ("question",),
    "image_text": (),
}
TEMPLATE_REQUIRED = {"classification": "text", "vqa": "question"}
DEFAULT_TEMPLATES = {
    "classification": DEFAULT_LAYOUTS.classification.template,
    "vqa": DEFAULT_LAYOUTS.vqa.template,
    "image_text": CAPTION_INSTRUCTION,
}
DEFAULT_PROMPTS = {"vqa": DEFAULT_LAYOUTS.vqa.prompt}
OPTIONS_JOINER = ", "


@functools.lru_cache(maxsize=1024)  # asked per rendered record; a stream has a few templates
def check_template(template: str, kind: str) -> str | None:
    """None when `template` is a valid instruction template for records of `kind`, else the reason."""
    allowed = TEMPLATE_FIELDS[kind]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces
        return f"invalid template {template!r}: {err} (write a literal brace as {{{{ or }}}})"
    used = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            return f"template {template!r}: positional placeholders ('{{}}') are not allowed; name the field"
        if name not in allowed:
            can = f"can use {', '.join(f'{{{a}}}' for a in allowed)}" if allowed else "take no placeholders"
            return f"template {template!r}: unknown placeholder {{{name}}}; {kind} templates {can}"
        if spec or conversion:
            return f"template {template!r}: placeholder {{{name}}} takes no format spec or conversion"
        used.add(name)
    required = TEMPLATE_REQUIRED.get(kind)
    if required and required not in used:
        return f"template {template!r}: {kind} templates must contain {{{required}}}"
    return None


def check_stream_format(s: StreamConfig, kind: str | None) -> None:
    """Instruction settings of one stream; `kind` is None when the records' kind is only known on reading
    (a JSONL stream without `kind`: then every kind a template could be for is tried)."""
    if s.format == "lm" and kind in ("classification", "image_text"):
        for key in ("template", "prompt", "options"):
            if getattr(s, key) is not None:
                raise FieldProblem(
                    f"applies to format: instruction; this {kind} stream has format: lm (set format: "
                    "instruction)",
                    key,
                )
        return
    if s.format != "lm" and kind not in (None, *TEMPLATE_FIELDS):
        raise FieldProblem(
            f"instruction samples are built from classification, vqa and image_text records; this stream's "
            f"records are {kind!r}",
            "format",
        )
    if s.options is not None:
        if s.format == "lm":
            raise FieldProblem("applies to format: instruction (classification records)", "options")
        if kind not in (None, "classification"):
            raise FieldProblem(f"applies to classification records, not {kind!r}", "options")
        if not s.options or any(not o.strip() for o in s.options) or len(set(s.options)) != len(s.options):
            raise FieldProblem("must be a non-empty list of distinct, non-empty labels", "options")
    if s.template is None:
        return
    templates = [s.template] if isinstance(s.template, str) else s.template
    if not templates:
        raise FieldProblem("an empty list; give at least one template (or leave it out)", "template")
    # In format lm only VQA records read a template.
    kinds = [kind] if kind is not None else list(TEMPLATE_FIELDS) if s.format != "lm" else ["vqa"]
    for j, template in enumerate(templates):
        at = ("template",) if isinstance(s.template, str) else ("template", j)
        reasons = [check_template(template, k) for k in kinds]
        if all(reasons):  # fits no kind it could be for
            raise FieldProblem(reasons[0], *at)


def stream_record_kind(stream: StreamConfig) -> str | None:
    """The record kind a stream holds: its `kind`, else its built-in dataset's; None for a file stream of
    mixed kinds."""
    if stream.kind is not None:
        return stream.kind
    from metalm.data.builtin import BUILTIN_DATASETS

    dataset = BUILTIN_DATASETS.get(stream.source)
    if dataset is None and stream.sharded:
        from metalm.data.shards import is_webdataset

        if is_webdataset(stream.source):
            return "image_text"  # WebDataset shards (img2dataset): image-caption pairs
    return dataset.kind if dataset is not None else None


def layouts_from_streams(streams: list[StreamConfig], saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request layouts (`metalm.data.layouts`) these streams train, over `saved` ones (a model trained
    further keeps the layouts of what it is not retrained on). VQA records are always laid out by their
    stream's template and prompt; image-text records in `lm` format are the image then the caption; in
    `instruction` format, like classification records, they follow their template and prompt."""
    layouts = {k: dict(v) for k, v in (saved or {}).items()}
    record_kinds = {"vqa": "vqa", "caption": "image_text", "classification": "classification"}
    for stream in streams:
        kind = stream_record_kind(stream)
        for layout, record_kind in record_kinds.items():
            if kind not in (record_kind, None):
                continue
            if record_kind == "vqa" or stream.supervised:
                layouts[layout] = {
                    "template": stream.templates(record_kind)[0],
                    "prompt": stream.decoder_prompt(record_kind),
                }
            elif record_kind == "image_text" and kind == "image_text":
                layouts[layout] = {"template": "", "prompt": ""}
    return layouts

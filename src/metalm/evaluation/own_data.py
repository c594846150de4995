"""`metalm eval MODEL --data FILE.jsonl`: evaluate one's own records in the layout the model trained on,
with scores per group next to each group's majority baseline.

A JSONL file (or folder) of records in the training schema (``docs/data.md``) becomes one task per record
kind it holds: ``vqa`` (open-ended answers, VQA accuracy), ``image_text`` (captions, CIDEr-D / BLEU-4) and
``classification`` (the file's labels ranked, accuracy). Each is asked in the model's saved layout for that
kind (``prompt_layouts``: ``vqa``, ``caption``, ``classification``), so nobody has to copy the training
template into a task file. A record's group is ``meta.<group_by>`` (``meta.type`` by default, e.g.
``{"kind": "vqa", ..., "meta": {"type": "colour"}}``); per group the table gives the model's score and what
always answering the group's most common gold answer scores (the majority baseline).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.tasks import Example, Task, TaskError

__all__ = ["data_tasks", "group_markdown", "group_scores", "read_own_data"]

# Task metric and layout per record kind; the other kinds (text, interleaved, audio_text) are not asked.
_KINDS = {"vqa": ("vqa_accuracy", "vqa"), "image_text": ("caption", "caption"), "classification": ("accuracy", "classification")}  # fmt: skip
OPTIONS_JOINER = ", "  # as metalm.training.config.OPTIONS_JOINER writes `{options}` (not imported: torch)


def _raw_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file's non-blank lines (the records' `meta`, which the parsed records drop)."""
    files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl") if path.is_dir() else [path]
    rows = []
    for file in files:
        for line in file.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def read_own_data(path: str | Path, group_by: str = "type") -> dict[str, list[Example]]:
    """The examples of a records file by record kind (only the kinds in :data:`_KINDS`). Every record is
    validated first (a bad one raises :class:`metalm.data.records.RecordError` with file:line:field)."""
    from metalm.data.records import read_records

    path = Path(path)
    records = list(read_records(path))
    rows = _raw_lines(path) if path.suffix == ".jsonl" or path.is_dir() else [{}] * len(records)
    if len(rows) != len(records):  # e.g. a Hugging Face datasets folder: no lines to read meta from
        rows = [{}] * len(records)
    by_kind: dict[str, list[Example]] = {}
    for n, (record, row) in enumerate(zip(records, rows), 1):
        if record.kind not in _KINDS:
            continue
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        group = meta.get(group_by)
        rid = record.id or f"{path.stem}/{n}"
        by_kind.setdefault(record.kind, []).append(
            _example(record, rid, None if group is None else str(group))
        )
    if not by_kind:
        raise TaskError(f"{path}: no vqa, image_text or classification records to evaluate")
    return by_kind


def _example(record: Any, rid: str, group: str | None) -> Example:
    if record.kind == "vqa":
        fields = {"question": record.question or ""}
        return Example(
            rid, fields, tuple(record.answers), image=record.image, audio=record.audio, group=group
        )
    if record.kind == "image_text":
        return Example(rid, {}, (record.text,), image=record.image, group=group)
    return Example(rid, {"text": record.text or ""}, (record.label,), audio=record.audio, group=group)


def data_tasks(
    path: str | Path,
    by_kind: Mapping[str, list[Example]],
    layouts: Any,
    demonstrations: Mapping[str, list[Example]] | None = None,
    demo_path: str | Path | None = None,
) -> list[Task]:
    """One task per record kind, in the model's trained layout (`layouts`: a
    :class:`metalm.data.layouts.PromptLayouts`). Named after the file, plus the kind when it holds several.
    Demonstrations come from the same file (never the query itself), or from `demonstrations`, the examples
    of another file (`demo_path`, e.g. the training records) by kind."""
    stem = Path(path).stem
    tasks = []
    for kind, examples in by_kind.items():
        metric, layout_name = _KINDS[kind]
        layout = getattr(layouts, layout_name)
        name = stem if len(by_kind) == 1 else f"{stem}-{kind}"
        pool = None
        if demonstrations is not None:
            pool = demonstrations.get(kind)
            if not pool:
                raise TaskError(f"{demo_path}: no {kind} records to show as demonstrations of {path}")
        options = None
        if kind == "classification":
            options = tuple(sorted({ex.answers[0] for ex in [*examples, *(pool or ())]}))
            examples, pool = _with_options(examples, options), pool and _with_options(pool, options)
        longest = max(len(answer.split()) for ex in examples for answer in ex.answers)
        tasks.append(
            Task(
                name=name,
                load=lambda split, examples=examples, pool=pool: (
                    pool if pool and split == "train" else examples
                ),
                input_template=layout.template,
                decoder_prompt=layout.prompt,
                layout=layout_name,
                scoring="rank" if kind == "classification" else "generate",
                options=options,
                metric=metric,
                # Room for the longest gold answer (a word is often 2-3 tokens), at most 48 tokens.
                max_new_tokens=min(48, 3 * longest + 2),
                demo_split="train" if pool else None,  # else from the same file, never the query itself
                description=f"{kind} records of {path}, in the model's trained {layout_name} layout"
                + (f", demonstrations from {demo_path}" if pool else ""),
            )
        )
    return tasks


def _with_options(examples: Sequence[Example], options: Sequence[str]) -> list[Example]:
    joined = OPTIONS_JOINER.join(options)
    return [Example(ex.id, {**ex.fields, "options": joined}, ex.answers, audio=ex.audio, group=ex.group) for ex in examples]  # fmt: skip


def group_scores(task: Task, examples: Sequence[Example], per_seed: Mapping[int, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per group: the model's mean per-example score x100 (averaged over seeds), the count, the group's most
    common gold answer and what answering it to every question of the group scores. Empty when no example
    has a group or the metric has no per-example score (CIDEr)."""
    if not any(ex.group is not None for ex in examples):
        return {}
    out: dict[str, dict[str, Any]] = {}
    groups = sorted({ex.group or "(none)" for ex in examples})
    for group in groups:
        idx = [i for i, ex in enumerate(examples) if (ex.group or "(none)") == group]
        seed_means = []
        for records in per_seed.values():
            scores = [records[i]["score"] for i in idx]
            if any(s is None for s in scores):
                return {}
            seed_means.append(100 * sum(scores) / len(scores))
        majority = Counter(task.label(examples[i]) for i in idx).most_common(1)[0][0]
        baseline = [task.example_score(majority, examples[i]) or 0.0 for i in idx]
        out[group] = {
            "n": len(idx),
            "score": sum(seed_means) / len(seed_means),
            "majority": majority,
            "majority_score": 100 * sum(baseline) / len(baseline),
        }
    return out


def group_markdown(summary: Mapping[str, Any]) -> list[str]:
    """Markdown tables of the per-group scores in `summary` (``results[task][k]["groups"]``)."""
    lines: list[str] = []
    for task, by_k in summary["results"].items():
        for k, entry in by_k.items():
            groups = entry.get("groups")
            if not groups:
                continue
            lines += [
                "",
                f"{task}, k={k}, by group (majority: always answering the group's most common gold answer):",
                "",
                "| group | n | score | majority answer | majority score |",
                "|---|---:|---:|---|---:|",
            ]
            for group, g in groups.items():
                lines.append(
                    f"| {group} | {g['n']} | {g['score']:.1f} | {g['majority']} | {g['majority_score']:.1f} |"
                )
    return lines

"""Does the model learn from demonstrations? easy-VQA by question type at k = 0, 1, 4 and fast binding.

One function runs the evaluation (:func:`evaluate_in_context`), one turns its files into a markdown table
(:func:`in_context_lines`); the quickstart report and the results script both use them. easy-VQA draws
k random demonstrations from the training split per query and seed (the GPT-3 protocol); fast binding
(:mod:`metalm.evaluation.fastbind`) shows k demonstrations *per class* under made-up names, beside the same
episodes with the real names. Demonstrations and query are asked in the model's trained layout.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.prediction_files import prediction_files

__all__ = [
    "FASTBIND_SHOWN",
    "ICL_SHOTS",
    "evaluate_in_context",
    "in_context_lines",
    "in_context_markdown",
    "in_context_table",
    "type_row",
]

ICL_SHOTS = (0, 1, 4)
FASTBIND_SHOWN = ("fastbind-shape-2way", "fastbind-shape-2way-real", "fastbind-color-5way")


def evaluate_in_context(
    model,
    processor,
    out_dir: Path,
    *,
    limit: int | None = 100,
    per_type: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    shots: Sequence[int] = ICL_SHOTS,
    fastbind: Sequence[str] = FASTBIND_SHOWN,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """easy-VQA at each k in `shots` and the fast-binding tasks at each k >= 1 (k = 0 is 0 % by
    construction for made-up names), every k > 0 over `seeds`; files under `out_dir`.

    `per_type`: easy-VQA asks that many questions of each type (colour, shape, yes/no) instead of `limit`
    in the split's mix, where colour questions are an eighth: a by-type change with demonstrations is then
    judged on as many colour questions as yes/no ones (`in_context_lines` gives its 95 % interval)."""
    from metalm.evaluation.runner import evaluate

    common = dict(seeds=list(seeds), batch_size=batch_size, progress=progress)
    vqa_subset = dict(limit=None, per_group=per_type) if per_type else dict(limit=limit)
    vqa = evaluate(
        model, processor, "easyvqa", shots=list(shots), out_dir=out_dir / "easyvqa", **vqa_subset, **common
    )
    binding = evaluate(
        model,
        processor,
        list(fastbind),
        shots=[k for k in shots if k > 0],
        out_dir=out_dir / "fastbind",
        limit=limit,
        **common,
    )
    return {"easyvqa": vqa, "fastbind": binding}


def _by_type(path: Path) -> dict[str, dict[str, float]]:
    from metalm.evaluation.breakdown import read_predictions, vqa_by_question_type

    return vqa_by_question_type(read_predictions(path))


def in_context_table(out_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {k: {"mean", "std", "n_seeds"}}}`` from the evaluation files under `out_dir`: easy-VQA
    overall and per question type (each seed's breakdown, then mean and spread over seeds), and each
    fast-binding task's accuracy. A question type's row also holds ``"change"``: from k = 0 to the largest k,
    the mean paired change on the same questions with its 95 % interval (``paired_change_by_group``)."""
    from metalm.evaluation.breakdown import QUESTION_TYPES

    table: dict[str, dict[str, dict[str, float]]] = {}

    def put(row: str, k: str, values: list[float]) -> None:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        table.setdefault(row, {})[k] = {
            "mean": statistics.fmean(values),
            "std": spread,
            "n_seeds": len(values),
        }

    vqa = out_dir / "easyvqa"
    if (vqa / "summary.json").exists():
        summary = json.loads((vqa / "summary.json").read_text())
        by_k = summary["results"]["easyvqa"]
        mix = f", {summary['per_group']} of each type" if summary.get("per_group") else ""
        changes = _changes(vqa, [int(k) for k in by_k])
        for k, entry in by_k.items():
            put(f"easy-VQA{mix} (n={entry['n']})", k, [m["vqa_accuracy"] for m in entry["seeds"].values()])
            seeds = [_by_type(p) for p in prediction_files(vqa, "easyvqa", int(k))]
            for qtype in QUESTION_TYPES:
                cells = [s[qtype] for s in seeds if qtype in s]
                if cells:
                    row = f"{_type_prefix(qtype)}{cells[0]['n']})"
                    put(row, k, [c["accuracy"] for c in cells])
                    if qtype in changes:
                        table[row]["change"] = changes[qtype]
        _yes_no_rows(vqa, list(by_k), put, table)
    binding = out_dir / "fastbind" / "summary.json"
    if binding.exists():
        for task, by_k in json.loads(binding.read_text())["results"].items():
            for k, entry in by_k.items():
                put(f"{task} (n={entry['n']})", k, [m["accuracy"] for m in entry["seeds"].values()])
    return table


def _type_prefix(qtype: str) -> str:
    return f"easy-VQA {qtype} (n="


def type_row(table: dict[str, dict[str, dict[str, float]]], qtype: str) -> dict[str, dict[str, float]] | None:
    """A question type's row of an :func:`in_context_table` (its name carries the question count), or None."""
    return next((v for row, v in table.items() if row.startswith(_type_prefix(qtype))), None)


def _yes_no_rows(
    vqa: Path,
    shots: list[str],
    put: Callable[[str, str, list[float]], None],
    table: dict[str, dict[str, dict[str, float]]],
) -> None:
    """easy-VQA's yes/no questions split by what the image answers (the attribute asked about, in the image
    or not; :func:`~metalm.evaluation.breakdown.what_the_image_answers`): a model that falls back on "no"
    with demonstrations keeps most of its yes/no score and loses every question about a colour the image
    has. Rows per k over seeds, with the paired change from k = 0 to the largest k."""
    from metalm.evaluation.breakdown import (
        image_answer_group,
        paired_change_by_group,
        read_predictions,
        yes_no_by_image,
    )

    questions = easy_vqa_questions()
    rows: dict[str, str] = {}  # group -> its row
    for k in shots:
        seeds = [
            yes_no_by_image(read_predictions(p), questions) for p in prediction_files(vqa, "easyvqa", int(k))
        ]
        for key in seeds[0] if seeds else {}:
            rows.setdefault(key, f"easy-VQA yes/no, {key} (n={seeds[0][key]['n']})")
            put(rows[key], k, [s[key]["accuracy"] for s in seeds if key in s])
    ks = [int(k) for k in shots]
    if 0 not in ks or max(ks) == 0:
        return
    for key, change in paired_change_by_group(
        vqa, "easyvqa", 0, max(ks), image_answer_group(questions)
    ).items():
        if key in rows:
            table[rows[key]]["change"] = {**change, "k": max(ks)}


def easy_vqa_questions() -> dict[str, str]:
    """easy-VQA's test questions by example id (the prediction records carry the id, not the question)."""
    from metalm.evaluation.tasks import builtin_task

    task = builtin_task("easyvqa")
    return {ex.id: ex.fields["question"] for ex in task.examples(task.eval_split)}


def _changes(vqa: Path, shots: list[int]) -> dict[str, dict[str, float]]:
    """Per question type, the paired change from k = 0 to the largest k (none without both)."""
    from metalm.evaluation.breakdown import paired_change_by_group

    if 0 not in shots or max(shots) == 0:
        return {}
    changes = paired_change_by_group(vqa, "easyvqa", 0, max(shots))
    return {group: {**change, "k": max(shots)} for group, change in changes.items()}


def in_context_lines(out_dir: Path, shots: Sequence[int] = ICL_SHOTS) -> list[str]:
    """The table of the evaluation files under `out_dir` as markdown (:func:`in_context_markdown`)."""
    return in_context_markdown(in_context_table(out_dir), shots)


def in_context_markdown(
    table: dict[str, dict[str, dict[str, float]]], shots: Sequence[int] = ICL_SHOTS
) -> list[str]:
    """An :func:`in_context_table` as markdown: a row per task (and easy-VQA question type), a column per k,
    and for each question type the change from k = 0 to the largest k with its 95 % interval."""
    head = " | ".join(f"k = {k}" for k in shots)
    to_k = next((by_k["change"]["k"] for by_k in table.values() if "change" in by_k), None)
    change_head = f" | change k = 0 → {to_k:.0f} (95 % interval) |" if to_k is not None else " |"
    lines = [f"| task | {head}{change_head}", "|---|" + "---:|" * (len(shots) + (to_k is not None))]
    for row, by_k in table.items():
        cells = []
        for k in shots:
            cell = by_k.get(str(k))
            if cell is None:
                cells.append("–")
            elif cell["n_seeds"] > 1:
                cells.append(f"{cell['mean']:.1f} ± {cell['std']:.1f}")
            else:
                cells.append(f"{cell['mean']:.1f}")
        if to_k is not None:
            change = by_k.get("change")
            cells.append(f"{change['mean']:+.1f} ± {change['ci95']:.1f}" if change else "–")
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return lines

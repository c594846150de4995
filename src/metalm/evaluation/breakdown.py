"""Per-question-type VQA accuracy and per-attribute caption correctness for easy-VQA predictions.

A headline VQA accuracy or CIDEr hides which attribute a model gets wrong: easy-VQA's shape questions and
the shape word of a caption are easy, colour is not, and the two average into a number that looks fine.
These functions read the ``predictions-<task>-k<k>-s<seed>.jsonl`` records the evaluation runner writes
(``prediction``, ``gold``, ``score``; VQA records also carry the question in ``prompt``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from metalm.data.builtin import EASY_VQA_COLORS, EASY_VQA_SHAPES

__all__ = [
    "ATTRIBUTES",
    "QUESTION_TYPES",
    "attribute_correctness",
    "caption_attributes",
    "question_type",
    "read_predictions",
    "vqa_by_question_type",
]

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "yes/no")
# Each attribute with the words that name its values in a caption.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(EASY_VQA_COLORS), "shape": EASY_VQA_SHAPES}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def question_type(answers: Iterable[str]) -> str:
    """The type of an easy-VQA question, read from its gold answers (the question wording varies, the
    answer vocabulary does not): a colour name → ``colour``, a shape name → ``shape``, yes/no → ``yes/no``."""
    for answer in answers:
        a = answer.strip().lower()
        if a in ("yes", "no"):
            return "yes/no"
        if a in EASY_VQA_COLORS:
            return "colour"
        if a in EASY_VQA_SHAPES:
            return "shape"
    raise ValueError(f"not an easy-VQA answer: {list(answers)!r}")


def caption_attributes(caption: str) -> dict[str, str | None]:
    """The value each attribute takes in ``caption``: the first colour / shape word it names, or None.
    The first, because a caption is read left to right and a later repetition does not undo a wrong
    first claim."""
    words = _words(caption)
    return {attr: next((w for w in words if w in values), None) for attr, values in ATTRIBUTES.items()}


def attribute_correctness(prediction: str, reference: str) -> dict[str, bool]:
    """Per attribute: does the prediction name the reference's value (first named value, see above)?"""
    want = caption_attributes(reference)
    got = caption_attributes(prediction)
    return {attr: want[attr] is not None and got[attr] == want[attr] for attr in ATTRIBUTES}


def _gold_list(gold: Any) -> list[str]:
    return [str(g) for g in gold] if isinstance(gold, list | tuple) else [str(gold)]


def vqa_by_question_type(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{type: {"accuracy": mean score ×100, "n": count}}`` from VQA prediction records (``score`` is the
    task's per-example VQA accuracy, 0..1)."""
    totals: dict[str, list[float]] = {t: [] for t in QUESTION_TYPES}
    for r in records:
        totals[question_type(_gold_list(r["gold"]))].append(float(r["score"]))
    return {t: {"accuracy": 100 * sum(s) / len(s), "n": len(s)} for t, s in totals.items() if s}


def caption_by_attribute(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{attribute: {"accuracy": % of captions naming the reference's value, "n": count}}``."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for r in records:
        for attr, ok in attribute_correctness(str(r["prediction"]), _gold_list(r["gold"])[0]).items():
            hits[attr].append(ok)
    return {a: {"accuracy": 100 * sum(h) / len(h), "n": len(h)} for a, h in hits.items() if h}


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of one predictions JSONL file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

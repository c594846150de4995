"""What a prediction owes to its demonstrations rather than to its query.

* **Copying** (:func:`copying_rates`): how often the prediction is one of the prompt's demonstration answers,
  beside how often the gold answer is. A model that learns from demonstrations copies about as often as
  the gold is among them; one that copies the demonstrations' labels (a 270M decoder answering a one-shot
  BBC prompt with the demonstration's topic 97 % of the time) copies far more often.
* **The demonstrations' vote** (:func:`demonstration_vote`): how often the answer most of the prompt's
  demonstrations show is the gold one, i.e. what a nearest-neighbour vote scores with no language model at
  all when the demonstrations are retrieved like the query (``metalm eval --demos similar``).
* **Contextual calibration** (:func:`content_free`, :func:`calibrated_choice`; Zhao et al. 2021,
  "Calibrate Before Use"): a ranked task's options are also scored after the same demonstrations with a
  content-free query (every text field ``N/A`` but those every query shares, such as a fixed question or
  a list of options; no image or audio), and each option's log-probability
  (normalised over the options) is divided by the content-free one, so that a label the demonstrations
  make likely whatever the query says no longer wins for that reason. Off by default (``metalm eval
  --calibrate``): the paper's protocol does not calibrate.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from metalm.evaluation import metrics as M
from metalm.evaluation.protocol import Example

__all__ = [
    "CALIBRATION",
    "CONTENT_FREE",
    "calibrated_choice",
    "content_free",
    "copying_markdown",
    "copying_rates",
    "demonstration_vote",
    "shared_fields",
]

CONTENT_FREE = "N/A"
# How a calibrated summary names its calibration (``summary["calibration"]``; None when off).
CALIBRATION = "content-free query (N/A), ranked tasks"


def content_free(ex: Example, keep: Collection[str] = ()) -> Example:
    """``ex`` with every text field but those in ``keep`` ``N/A`` and no image or audio: the query of
    calibration's reference prompt (the same demonstrations, the same options)."""
    fields = {
        key: CONTENT_FREE if isinstance(value, str) and key not in keep else value
        for key, value in ex.fields.items()
    }
    return replace(ex, id=f"{ex.id}/content-free", fields=fields, image=None, audio=None)


def shared_fields(queries: Sequence[Example]) -> set[str]:
    """The fields every one of several queries has with the same value (a task's fixed question, the list
    of options of a classification file): the task's frame, which a content-free query keeps. None of
    one query's."""
    if len(queries) < 2:
        return set()
    first = queries[0].fields
    return {
        key for key, value in first.items() if all(q.fields.get(key, object()) == value for q in queries[1:])
    }


def _log_softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def calibrated_choice(
    scores: Sequence[float], content_free_scores: Sequence[float]
) -> tuple[int, list[float]]:
    """The best option after contextual calibration, and every option's calibrated score: its
    log-probability among the options minus the content-free query's (``p / p_cf``, renormalised)."""
    if len(scores) != len(content_free_scores) or not scores:
        raise ValueError("need one content-free score per option and at least one option")
    calibrated = [a - b for a, b in zip(_log_softmax(scores), _log_softmax(content_free_scores))]
    return max(range(len(calibrated)), key=calibrated.__getitem__), calibrated


def _same(a: Any, b: str) -> bool:
    return M.normalize_squad_answer(str(a)) == M.normalize_squad_answer(b)


def among(value: Any, answers: Sequence[str]) -> bool:
    """Whether ``value`` (an answer, or a list of gold answers) is one of the demonstrations' ``answers``,
    normalised as VQA/SQuAD answers are compared."""
    values = value if isinstance(value, list) else [value]
    return any(_same(v, a) for v in values for a in answers)


def copying_rates(records: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Over the records that had demonstrations (``demonstration_answers``): the share (x100) whose
    prediction is one of them, and the share whose gold answer is (what copying costs nothing at). None
    when no record had demonstrations."""
    shown = [r for r in records if r.get("demonstration_answers")]
    if not shown:
        return None
    return {
        "prediction_among_demonstrations": 100 * sum(among(r["prediction"], r["demonstration_answers"]) for r in shown) / len(shown),
        "gold_among_demonstrations": 100 * sum(among(r["gold"], r["demonstration_answers"]) for r in shown) / len(shown),
        "n": len(shown),
    }  # fmt: skip


def demonstration_vote(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Over the records that had demonstrations: the share (x100) whose gold answer is the one most of
    its demonstrations show (a tie goes to the one shown nearest the query: with retrieved demonstrations,
    the most similar). None when no record had demonstrations."""
    shown = [r for r in records if r.get("demonstration_answers")]
    if not shown:
        return None

    def right(record: Mapping[str, Any]) -> bool:
        answers = [str(a) for a in record["demonstration_answers"]]  # least similar first
        counts = Counter(M.normalize_squad_answer(a) for a in answers)
        vote = max(range(len(answers)), key=lambda i: (counts[M.normalize_squad_answer(answers[i])], i))
        golds = record["gold"] if isinstance(record["gold"], list) else [record["gold"]]
        return any(_same(g, answers[vote]) for g in golds)

    return 100 * sum(map(right, shown)) / len(shown)


def copying_markdown(summary: Mapping[str, Any]) -> list[str]:
    """A table of the copying rates in `summary` (``results[task][k]["copying"]``, k > 0), or nothing."""
    rows = [
        f"| {task} | {k} | {c['prediction_among_demonstrations']:.1f} | {c['gold_among_demonstrations']:.1f} |"
        for task, by_k in summary["results"].items()
        for k, entry in by_k.items()
        if (c := entry.get("copying"))
    ]
    if not rows:
        return []
    return [
        "",
        "Demonstrations' answers (% of prompts, mean over seeds): how often the prediction is one of them, beside "
        "how often the gold answer is. Where the first is far above the second, the model copies the "
        "demonstrations' labels instead of learning from them.",
        "",
        "| task | k | prediction among them | gold among them |",
        "|---|---:|---:|---:|",
        *rows,
    ]

"""Per-question-type VQA accuracy and per-attribute caption correctness for easy-VQA predictions.

A headline VQA accuracy or CIDEr hides which attribute a model gets wrong: easy-VQA's shape questions and
the shape word of a caption are easy, colour is not, and the two average into a number that looks fine.
These functions read the ``predictions-<task>-k<k>-s<seed>.jsonl`` records the evaluation runner writes
(``prediction``, ``gold``, ``score``; VQA records also carry the question in ``prompt``).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from metalm.data.builtin import EASY_VQA_COLORS, EASY_VQA_SHAPES
from metalm.evaluation.demonstrations import among
from metalm.evaluation.prediction_files import prediction_files, read_predictions

__all__ = [
    "ATTRIBUTES",
    "QUESTION_TYPES",
    "attribute_correctness",
    "breakdown_over_seeds",
    "paired_change_by_group",
    "answer_flips",
    "flips_sentence",
    "caption_attributes",
    "question_attribute",
    "question_type",
    "question_wording",
    "read_predictions",
    "vqa_by_question_type",
    "wording_prior",
    "wording_prior_by_question_type",
    "vqa_against_wording_prior",
    "image_answer_group",
    "what_the_image_answers",
    "yes_no_by_image",
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


def question_wording(question: str) -> str:
    """The question with its colour and shape words masked: all that a model ignoring the image can use
    ("is there not a red shape?" -> "is there not a <colour> shape?")."""
    masked = []
    for word in re.findall(r"[a-z]+|[^a-z\s]", question.lower()):
        attr = next((a for a, values in ATTRIBUTES.items() if word in values), None)
        masked.append(f"<{attr}>" if attr else word)
    return " ".join(masked)


def wording_prior(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The most common answer of each question wording, from (question, answer) pairs of a training split:
    the language prior a model can learn without looking at the image."""
    counts: dict[str, Counter[str]] = {}
    for question, answer in pairs:
        counts.setdefault(question_wording(question), Counter())[answer.strip().lower()] += 1
    return {wording: c.most_common(1)[0][0] for wording, c in counts.items()}


def wording_prior_by_question_type(
    examples: Iterable[tuple[str, Sequence[str]]], prior: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """What answering every (question, gold answers) example with its wording's prior scores, per question
    type (exact match with any gold answer; a wording unseen in training scores 0). A model's yes/no
    accuracy at this level says it answers from the question's wording, not from the image."""
    totals: dict[str, list[float]] = {t: [] for t in QUESTION_TYPES}
    for question, answers in examples:
        guess = prior.get(question_wording(question))
        totals[question_type(answers)].append(float(guess in {a.strip().lower() for a in answers}))
    return {t: {"accuracy": 100 * sum(s) / len(s), "n": len(s)} for t, s in totals.items() if s}


def vqa_against_wording_prior(
    records: Iterable[Mapping[str, Any]], questions: Mapping[str, str], prior: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """VQA accuracy per question type on the questions whose wording alone gives a wrong answer (their
    gold answers do not include the wording's prior): the questions only the image can answer. On
    easy-VQA's yes/no questions this is the measure that tells a model that looks from one that answers
    from the wording (which scores 0 here by construction). ``questions``: example id → question text;
    records without a question are left out."""
    totals: dict[str, list[float]] = {t: [] for t in QUESTION_TYPES}
    for r in records:
        question = questions.get(r["id"])
        gold = _gold_list(r["gold"])
        if question is None or prior.get(question_wording(question)) in {g.strip().lower() for g in gold}:
            continue
        kind = question_type(gold)
        totals[kind].append(float(r["score"]))
        if kind == "yes/no":  # which attribute the yes/no question asks about: their difficulty differs
            asked = question_attribute(question)
            if asked:
                totals.setdefault(f"yes/no: {asked}", []).append(float(r["score"]))
    return {t: {"accuracy": 100 * sum(s) / len(s), "n": len(s)} for t, s in totals.items() if s}


def question_attribute(question: str) -> str | None:
    """The attribute a question names a value of (``"is there a red shape?"`` → ``colour``), or None."""
    words = set(_words(question))
    return next((attr for attr, values in ATTRIBUTES.items() if words & set(values)), None)


def what_the_image_answers(question: str, gold: Sequence[str]) -> str | None:
    """For an easy-VQA yes/no question, the attribute it asks about and whether the image has the value it
    names: ``"colour, in the image"`` for "is there a red shape?" answered yes or "is there not a red
    shape?" answered no. None for other questions. A model that answers from the wording, or says "no"
    whenever unsure, is right on the questions about a value the image lacks (most of them) and wrong on
    the others: the split shows it where the yes/no accuracy does not."""
    answers = {g.strip().lower() for g in gold}
    asked = question_attribute(question)
    if asked is None or not answers & {"yes", "no"}:
        return None
    negated = bool({"not", "no"} & set(_words(question)))
    has = ("yes" in answers) != negated
    return f"{asked}, {'in' if has else 'not in'} the image"


def image_answer_group(questions: Mapping[str, str]) -> Callable[[Mapping[str, Any]], str | None]:
    """A prediction record's yes/no group by what the image answers (:func:`what_the_image_answers`), for
    :func:`paired_change_by_group`. ``questions``: example id → question text (None without one)."""

    def group_of(record: Mapping[str, Any]) -> str | None:
        question = questions.get(record["id"])
        return what_the_image_answers(question, _gold_list(record["gold"])) if question else None

    return group_of


def yes_no_by_image(
    records: Iterable[Mapping[str, Any]], questions: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Yes/no accuracy by what the image answers (:func:`what_the_image_answers`): ``{"colour, in the
    image": {"accuracy", "n"}, ...}``. ``questions``: example id → question text; records without one, or
    not yes/no, are left out."""
    group_of = image_answer_group(questions)
    totals: dict[str, list[float]] = {}
    for r in records:
        key = group_of(r)
        if key:
            totals.setdefault(key, []).append(float(r["score"]))
    return {key: {"accuracy": 100 * sum(s) / len(s), "n": len(s)} for key, s in sorted(totals.items())}


def _seed_runs(out: str | Path, task: str, k: int) -> list[list[dict[str, Any]]]:
    """The prediction rows of each seed's run of ``task`` at ``k`` demonstrations in ``out``, in seed order."""
    return [read_predictions(p) for p in prediction_files(out, task, k)]


def breakdown_over_seeds(
    out: str | Path,
    task: str,
    k: int,
    breakdown: Callable[[list[dict[str, Any]]], dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    """``breakdown`` (by question type or attribute) of every seed's ``predictions-<task>-k<k>-s*.jsonl``
    under ``out``, as the mean and std of each key's accuracy over the seeds, with its count in one seed."""
    tables = [breakdown(rows) for rows in _seed_runs(out, task, k)]
    merged: dict[str, dict[str, float]] = {}
    for key in tables[0] if tables else {}:
        values = [t[key]["accuracy"] for t in tables if key in t]
        merged[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": tables[0][key]["n"],
        }
    return merged


def paired_change_by_group(
    out: str | Path,
    task: str,
    k_from: int,
    k_to: int,
    group_of: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per group (the records' ``group``, or what ``group_of`` makes of a record; None: left out), how the
    score changes from ``k_from`` to ``k_to`` demonstrations on the very same questions: each question's
    score at ``k_to`` averaged over that run's seeds, minus its score at ``k_from`` (also averaged over
    seeds). ``mean`` is that change x100, ``ci95`` the half-width of its normal 95 % interval (1.96 standard
    errors over questions), with the group's scores at both k and its question count: a shortfall smaller
    than ``ci95`` is not told apart from none."""

    def per_question(k: int) -> list[tuple[str, float]]:
        runs = _seed_runs(out, task, k)
        if not runs:
            raise FileNotFoundError(f"{out}: no predictions-{task}-k{k}-s*.jsonl")
        return [(_group(rows[0]), statistics.fmean(float(r["score"]) for r in rows)) for rows in zip(*runs)]

    def _group(record: Mapping[str, Any]) -> str | None:
        return group_of(record) if group_of else str(record.get("group"))

    before, after = per_question(k_from), per_question(k_to)
    if [g for g, _ in before] != [g for g, _ in after]:
        raise ValueError(f"{out}: k={k_from} and k={k_to} were not asked the same questions")
    return {
        group: paired_change([a for (g, a) in before if g == group], [b for (g, b) in after if g == group])
        for group in sorted({g for g, _ in before if g is not None})
    }


def paired_change(before: list[float], after: list[float]) -> dict[str, float]:
    """The change from `before` to `after`, scores (0-1) of the same questions in the same order: ``n``,
    ``from`` and ``to`` (x100), ``mean`` of the per-question differences (x100) and ``ci95``, the half-width
    of its normal 95 % interval (1.96 standard errors over questions)."""
    diffs = [100 * (b - a) for a, b in zip(before, after, strict=True)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {
        "n": len(diffs),
        "from": 100 * statistics.fmean(before),
        "to": 100 * statistics.fmean(after),
        "mean": statistics.fmean(diffs),
        "ci95": 1.96 * spread / len(diffs) ** 0.5,
    }


def answer_flips(
    out: str | Path, task: str, k_from: int, k_to: int, group: str, questions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Which answers of one group change from ``k_from`` to ``k_to`` demonstrations (each ``k_to`` seed
    against the one ``k_from`` run, the same questions): ``lost`` (right, then wrong) and ``gained`` counts
    summed over seeds, ``seeds``, the commonest ``confusions`` among the lost, as (gold, new answer,
    count), most frequent first; ``copied``: how many lost answers are the answer of a demonstration shown
    before that question (its ``demonstration_answers``, compared as `copying_rates` compares them), and ``gold_shown``: in how many a
    demonstration showed the right answer. A model that copies its demonstrations has ``copied`` well above
    ``gold_shown``; one whose reading of the query itself got worse, about the same. With ``questions``
    (example id → question text): ``negated``, how many lost answers were to a question with a negation
    ("is there not a red shape?"), and ``negated_questions``, how many of the group's questions have one."""
    firsts = _seed_runs(out, task, k_from)
    if not firsts:
        raise FileNotFoundError(f"{out}: no predictions-{task}-k{k_from}-s*.jsonl")
    before = {r["id"]: r for r in firsts[0] if r.get("group") == group}
    lost = gained = copied = gold_shown = negated = 0

    def is_negated(record: Mapping[str, Any]) -> bool:
        return bool({"not", "no"} & set(_words((questions or {}).get(record["id"], ""))))

    confusions: Counter[tuple[str, str]] = Counter()
    runs = _seed_runs(out, task, k_to)
    for rows in runs:
        for r in rows:
            was = before.get(r["id"])
            if was is None:
                continue
            if was["score"] >= 1 > r["score"]:
                lost += 1
                answer = str(r["prediction"]).strip()
                confusions[(_gold_list(r["gold"])[0], answer)] += 1
                shown = r.get("demonstration_answers") or []
                copied += among(answer, shown)
                gold_shown += among(_gold_list(r["gold"]), shown)
                negated += is_negated(r)
            elif r["score"] > was["score"]:
                gained += 1
    flips = {
        "lost": lost,
        "gained": gained,
        "seeds": len(runs),
        "questions": len(before),
        "confusions": [(g, p, n) for (g, p), n in confusions.most_common()],
        "copied": copied,
        "gold_shown": gold_shown,
    }
    if questions is not None:
        flips["negated"] = negated
        flips["negated_questions"] = sum(is_negated(r) for r in before.values())
    return flips


def flips_sentence(flips: dict[str, Any]) -> str:
    """`answer_flips`' figures in words, for a results page."""
    lost = flips["lost"]
    top = ", ".join(f"{g} → {p} {n}" for g, p, n in flips["confusions"][:4])
    text = (
        f"over {flips['seeds']} seeds of {flips['questions']} questions, {lost} answer{'s' if lost != 1 else ''} "
        f"right at k = 0 {'were' if lost != 1 else 'was'} wrong at k = 4 and {flips['gained']} the other way round"
        + (f"; the lost ones become {top}" if top else "")
    )
    if "copied" in flips and lost:  # absent from older results
        text += (
            f" ({flips['copied']} of the {lost} the answer of a demonstration shown before the question; "
            f"the right answer was shown before {flips.get('gold_shown', 0)})"
        )
    if flips.get("negated_questions") and lost:
        text += (
            f"; {flips['negated']} of the {lost} ask with a negation, as {flips['negated_questions']} of the "
            f"{flips['questions']} questions do"
        )
    return text

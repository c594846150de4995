"""Evaluation protocols: examples, templates, scoring mode and metric.

A :class:`Task` turns an :class:`Example` into

* an *input* -- the text the text encoder reads (rendered from ``input_template`` with ``{field}``
  placeholders), plus an optional image for the vision encoder;
* a *target* -- decoder text (``target_delimiter + target_template``): a demonstration's label, or one
  candidate option when options are ranked.

Scoring is ``"rank"`` (every option is scored as decoder text after the prompt, by the sum or the mean of
its tokens' log-probabilities; the best one is the prediction) or ``"generate"`` (greedy decoding, then a
metric). Metrics are reported on a 0-100 scale (accuracy 54.2, CIDEr 110.2, BLEU-4 30.1).

Where tasks come from: the built-in catalogue (:mod:`metalm.evaluation.catalogue`, a data table) and user
task files (:mod:`metalm.evaluation.task_file`); :mod:`metalm.evaluation.tasks` gathers them.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from metalm.evaluation import metrics as M

__all__ = [
    "METRICS",
    "Example",
    "Task",
    "TaskError",
    "in_model_layout",
    "with_overrides",
]

SCORING_MODES = ("rank", "generate")
NORMALIZATIONS = ("sum", "mean")
# metric name -> the score keys it reports (all on a 0-100 scale).
METRICS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy", "macro_f1"),
    "exact_match": ("exact_match",),
    "vqa_accuracy": ("vqa_accuracy",),
    "caption": ("CIDEr", "BLEU-4"),
    "rouge_l": ("rouge_l",),
    "squad_f1": ("f1", "exact_match"),
    "wer": ("wer",),  # the one lower-is-better score: word error rate in percent
}


class TaskError(ValueError):
    """A task definition or a task file is invalid; the message names the task and the field."""


@dataclass(frozen=True)
class Example:
    """One evaluation example.

    ``fields`` feed the templates (``{question}``, ``{text}`` ...); ``answers`` holds the gold label(s)
    (the first one is the demonstration label and the class for accuracy); ``options`` are candidates
    for this example (else the task's); ``image`` is a path / data URL for the vision encoder, ``audio``
    one for the audio encoder (heard after the image, before the rendered input); ``group``: what the
    per-group table counts it under (``metalm eval --data``; see :mod:`metalm.evaluation.own_data`)."""

    id: str
    fields: dict[str, Any]
    answers: tuple[str, ...]
    options: tuple[str, ...] | None = None
    image: str | None = None
    audio: str | None = None
    group: str | None = None


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass
class Task:
    """An evaluation protocol over a dataset.

    Args:
        name: task name, used in output file names.
        load: ``split -> list[Example]``.
        input_template: text for the text encoder (``{field}`` placeholders; may be empty when the image
            alone is the input).
        fewshot_input_template: template used when demonstrations are present (default: ``input_template``);
            the paper uses "question: [q] answer:" zero-shot and "Question: [q] Answer:" few-shot.
        decoder_prompt / fewshot_decoder_prompt: optional plain decoder text placed right after the input,
            before the target (e.g. "answer:" when the model was trained on ``Enc("question: Q") answer: A``).
        target_template: decoder text of a label or option, ``{answer}`` = the label.
        target_delimiter: prepended to every target (a space, so BPE decoders see " Positive").
        scoring: ``"rank"`` or ``"generate"``.
        normalization: for ``rank``: ``"sum"`` or ``"mean"`` of the option tokens' log-probabilities.
        options: task-wide candidate labels (``rank``); an example's own ``options`` win.
        metric: one of :data:`METRICS`.
        max_new_tokens / stop: greedy decoding budget and stop strings (``generate``).
        eval_split / demo_split: split evaluated / split demonstrations are drawn from (``None``: the eval
            split itself, never the query).
        truncate_field / truncate_words: shorten that field to its first N words (both modes alike, so
            MetaLM and the GPT baseline see the same text); the field is also shortened further when an
            input would not fit the text encoder.
        caption_tokenizer: ``"ptb"`` (pycocoevalcap's Java PTB tokenizer) or ``"simple"``.
        layout: the request layout (:mod:`metalm.data.layouts`) whose zero-shot form this task asks in; a
            model that saved its own layouts (``prompt_layouts``) is asked in its trained form instead.
        episodes: ``(query, pool, k, seed, index) -> (demonstrations, query)`` for a task whose
            demonstrations depend on the query and rename its answers (:mod:`metalm.evaluation.fastbind`);
            None: ``k`` demonstrations drawn at random from the pool.
    """

    name: str
    load: Callable[[str], list[Example]]
    input_template: str
    fewshot_input_template: str | None = None
    decoder_prompt: str = ""
    fewshot_decoder_prompt: str | None = None
    target_template: str = "{answer}"
    target_delimiter: str = " "
    scoring: str = "rank"
    normalization: str = "sum"
    options: tuple[str, ...] | None = None
    metric: str = "accuracy"
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    eval_split: str = "test"
    demo_split: str | None = "train"
    truncate_field: str | None = None
    truncate_words: int | None = None
    caption_tokenizer: str = "ptb"
    description: str = ""
    layout: str | None = None
    episodes: Callable[[Example, list[Example], int, int, int], tuple[list[Example], Example]] | None = None
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.scoring not in SCORING_MODES:
            raise TaskError(f"{where}: scoring must be one of {SCORING_MODES}, got {self.scoring!r}")
        if self.normalization not in NORMALIZATIONS:
            raise TaskError(
                f"{where}: normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.metric not in METRICS:
            raise TaskError(f"{where}: metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.scoring == "rank" and self.metric in (
            "caption",
            "rouge_l",
            "squad_f1",
            "vqa_accuracy",
            "wer",
        ):
            raise TaskError(f"{where}: metric {self.metric!r} needs scoring 'generate'")
        if "answer" not in _placeholders(self.target_template):
            raise TaskError(
                f"{where}: target_template must contain '{{answer}}', got {self.target_template!r}"
            )
        if self.options is not None:
            self.options = tuple(str(o) for o in self.options)
        self.stop = tuple(self.stop)

    # --- data --------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[Example]:
        """Examples of ``split`` (loaded once, then cached)."""
        if split not in self._cache:
            examples = self.load(split)
            if not examples:
                raise TaskError(f"task {self.name!r}: split {split!r} has no examples")
            self._cache[split] = examples
        return self._cache[split]

    # --- templates ---------------------------------------------------------------------------------
    def _fields(self, ex: Example, truncate_to: int | None = None) -> dict[str, Any]:
        fields = dict(ex.fields)
        limit = self.truncate_words if truncate_to is None else truncate_to
        if self.truncate_field and limit is not None and self.truncate_field in fields:
            words = str(fields[self.truncate_field]).split()
            if len(words) > limit:
                fields[self.truncate_field] = " ".join(words[:limit])
        return fields

    def _format(self, template: str, fields: dict[str, Any], ex: Example) -> str:
        try:
            return template.format_map(fields)
        except KeyError as err:
            raise TaskError(
                f"task {self.name!r}, example {ex.id!r}: template {template!r} uses field {err.args[0]!r}, "
                f"which the example lacks (it has {sorted(fields)})"
            ) from None

    def render_input(
        self, ex: Example, *, fewshot: bool = False, fits: Callable[[str], bool] | None = None
    ) -> str:
        """The input text of ``ex``. ``fits(text)`` (e.g. "fits the text encoder") shortens
        ``truncate_field`` word by word (binary search) until it holds; without a truncatable field an
        over-long input is returned as is and the processor reports it."""
        template = (self.fewshot_input_template or self.input_template) if fewshot else self.input_template
        text = self._format(template, self._fields(ex), ex)
        if fits is None or fits(text) or not self.truncate_field or self.truncate_field not in ex.fields:
            return text
        lo, hi = 0, len(str(self._fields(ex)[self.truncate_field]).split())
        while lo < hi:  # largest word count that fits
            mid = (lo + hi + 1) // 2
            if fits(self._format(template, self._fields(ex, mid), ex)):
                lo = mid
            else:
                hi = mid - 1
        return self._format(template, self._fields(ex, lo), ex)

    def render_decoder_prompt(self, *, fewshot: bool = False) -> str:
        """Decoder text between the input and the target (may be empty)."""
        if fewshot and self.fewshot_decoder_prompt is not None:
            return self.fewshot_decoder_prompt
        return self.decoder_prompt

    def render_target(self, answer: str) -> str:
        """Decoder text of a label or option (with the delimiter)."""
        return self.target_delimiter + self.target_template.format(answer=answer)

    def label(self, ex: Example) -> str:
        return ex.answers[0]

    def options_for(self, ex: Example) -> tuple[str, ...]:
        options = ex.options if ex.options is not None else self.options
        if not options:
            raise TaskError(f"task {self.name!r}, example {ex.id!r}: scoring 'rank' needs options")
        return options

    # --- metrics -----------------------------------------------------------------------------------
    def example_score(self, prediction: str, ex: Example) -> float | None:
        """Per-example score in [0, 1] (``None`` for corpus-level metrics such as CIDEr)."""
        if self.metric == "accuracy":
            gold = self.label(ex)
            if self.scoring == "generate":
                return float(M.normalize_squad_answer(prediction) == M.normalize_squad_answer(gold))
            return float(prediction == gold)
        if self.metric == "exact_match":
            return M.exact_match(prediction, list(ex.answers))
        if self.metric == "vqa_accuracy":
            return M.vqa_accuracy(prediction, list(ex.answers))
        if self.metric == "rouge_l":
            return M.rouge_l(prediction, list(ex.answers))
        if self.metric == "squad_f1":
            return M.squad_f1(prediction, list(ex.answers))
        return None

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, Any]:
        """Task metrics on a 0-100 scale, plus ``n``."""
        if len(predictions) != len(examples) or not examples:
            raise ValueError("need one prediction per example and at least one example")
        out: dict[str, Any] = {}
        if self.metric == "accuracy":
            if self.scoring == "generate":
                preds = [M.normalize_squad_answer(p) for p in predictions]
                golds = [M.normalize_squad_answer(self.label(e)) for e in examples]
            else:
                preds, golds = list(predictions), [self.label(e) for e in examples]
            labels = None
            if self.options is not None:
                labels = (
                    [M.normalize_squad_answer(o) for o in self.options]
                    if self.scoring == "generate"
                    else list(self.options)
                )
            out["accuracy"] = 100 * M.accuracy(preds, golds)
            out["macro_f1"] = 100 * M.macro_f1(preds, golds, labels)
        elif self.metric == "caption":
            ids = [str(i) for i in range(len(examples))]
            scores = M.caption_scores(
                dict(zip(ids, predictions)),
                {i: list(e.answers) for i, e in zip(ids, examples)},
                tokenizer=self.caption_tokenizer,
            )
            out["CIDEr"] = 100 * scores["CIDEr"]
            out["BLEU-4"] = 100 * scores["BLEU-4"]
            out["caption_tokenizer"] = scores["tokenizer"]
        elif self.metric == "wer":
            out["wer"] = 100 * M.word_error_rate(predictions, [self.label(e) for e in examples])
        elif self.metric == "squad_f1":
            out["f1"] = (
                100
                * sum(M.squad_f1(p, list(e.answers)) for p, e in zip(predictions, examples))
                / len(examples)
            )
            out["exact_match"] = (
                100
                * sum(M.exact_match(p, list(e.answers)) for p, e in zip(predictions, examples))
                / len(examples)
            )
        else:
            key = METRICS[self.metric][0]
            scores_ = [self.example_score(p, e) for p, e in zip(predictions, examples)]
            out[key] = 100 * sum(s or 0.0 for s in scores_) / len(scores_)
        out["n"] = len(examples)
        return out

    def settings(self) -> dict[str, Any]:
        """The protocol, for summary.json."""
        return {
            "input_template": self.input_template,
            "fewshot_input_template": self.fewshot_input_template or self.input_template,
            "decoder_prompt": self.decoder_prompt,
            "fewshot_decoder_prompt": self.render_decoder_prompt(fewshot=True),
            "target_template": self.target_template,
            "target_delimiter": self.target_delimiter,
            "scoring": self.scoring,
            "normalization": self.normalization if self.scoring == "rank" else None,
            "options": list(self.options) if self.options else None,
            "metric": self.metric,
            "max_new_tokens": self.max_new_tokens if self.scoring == "generate" else None,
            "stop": list(self.stop) if self.scoring == "generate" else None,
            "eval_split": self.eval_split,
            "demo_split": self.demo_split,
            "truncate_field": self.truncate_field,
            "truncate_words": self.truncate_words,
            "caption_tokenizer": self.caption_tokenizer if self.metric == "caption" else None,
        }


def in_model_layout(task: Task, config: Any) -> Task:
    """`task` asked the way the model was trained: its template and decoder prompt from the model's saved
    layout (`prompt_layouts`), when the task names a layout and the model saved one. Demonstrations and
    query alike: a model's in-context rows (``format: in_context``) are its trained layout repeated, so the
    paper's capitalised few-shot prompt ("Question: ... Answer:") is used only for a model that saved none."""
    saved = getattr(config, "prompt_layouts", None) or {}
    if task.layout is None or task.layout not in saved:
        return task
    from metalm.data.layouts import layouts_of

    layout = getattr(layouts_of(config), task.layout)
    return with_overrides(
        task, input_template=layout.template, decoder_prompt=layout.prompt,
        fewshot_input_template=layout.template, fewshot_decoder_prompt=layout.prompt,
    )  # fmt: skip


def with_overrides(task: Task, **changes: Any) -> Task:
    """A copy of ``task`` with some settings changed (e.g. ``normalization="mean"``)."""
    return replace(task, _cache={}, **changes)

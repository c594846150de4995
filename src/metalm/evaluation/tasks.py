"""Evaluation tasks: examples, templates, scoring mode and metric.

A :class:`Task` turns an :class:`Example` into

* an *input* -- the text the text encoder reads (rendered from ``input_template`` with ``{field}``
  placeholders), plus an optional image for the vision encoder;
* a *target* -- decoder text (``target_delimiter + target_template``): a demonstration's label, or one
  candidate option when options are ranked.

Scoring is ``"rank"`` (every option is scored as decoder text after the prompt, by the sum or the mean of
its tokens' log-probabilities; the best one is the prediction) or ``"generate"`` (greedy decoding, then a
metric). Metrics are reported on a 0-100 scale (accuracy 54.2, CIDEr 110.2, BLEU-4 30.1).

Built-in tasks (:data:`BUILTIN_TASKS`) read :func:`metalm.data.builtin.load_builtin`; user tasks come
from a small YAML/JSON task file with a JSONL data file (:func:`load_task_file`, ``docs/evaluation.md``).
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from metalm.data.layouts import CAPTION_INSTRUCTION, DEFAULT_LAYOUTS
from metalm.evaluation import metrics as M

__all__ = [
    "BUILTIN_TASKS",
    "METRICS",
    "Example",
    "Task",
    "TaskError",
    "builtin_task",
    "get_task",
    "load_task_file",
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


# ---------------------------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------------------------
def _easyvqa(split: str) -> list[Example]:
    from metalm.data.builtin import load_builtin

    return [
        Example(
            id=r.id or f"easyvqa/{split}/{i}",
            fields={"question": r.question},
            answers=tuple(r.answers),
            image=r.image,
        )
        for i, r in enumerate(load_builtin("easy_vqa_vqa", split))
    ]


def _easyvqa_caption(split: str) -> list[Example]:
    from metalm.data.builtin import load_builtin

    return [
        Example(id=r.id or f"easyvqa-caption/{split}/{i}", fields={}, answers=(r.text,), image=r.image)
        for i, r in enumerate(load_builtin("easy_vqa_captions", split))
    ]


def _spoken_vqa(split: str, *, spoken: bool = True) -> list[Example]:
    """speech_easy_vqa's records: the question heard (`spoken`), or the same questions typed."""
    from metalm.data.builtin import load_builtin

    return [
        Example(
            id=r.id,
            fields={"question": r.question},
            answers=tuple(r.answers),
            image=r.image,
            audio=r.audio if spoken else None,
        )
        for r in load_builtin("speech_easy_vqa", split)
    ]


def _transcribe(split: str) -> list[Example]:
    from metalm.data.builtin import load_builtin

    return [
        Example(id=r.id, fields={}, answers=(r.text,), audio=r.audio)
        for r in load_builtin("speech_bbc", split)
    ]


BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_topic(split: str) -> list[Example]:
    from metalm.data.builtin import load_builtin

    # `options` written the way an instruction stream writes them (metalm.training.config.OPTIONS_JOINER).
    options = ", ".join(BBC_TOPICS)
    return [
        Example(
            id=r.id or f"bbc-topic/{split}/{i}",
            fields={"text": " ".join(r.text.split()), "options": options},
            answers=(r.label,),
        )
        for i, r in enumerate(load_builtin("bbc_news", split))
    ]


# The ten largest WordNet noun lexicographer files (``noun.`` dropped), alphabetical.
WORDNET_CATEGORIES: tuple[str, ...] = (
    "act", "animal", "artifact", "attribute", "communication", "location", "person", "plant", "state",
    "substance",
)  # fmt: skip
GCIDE_POS_LABELS: tuple[str, ...] = ("adjective", "adverb", "noun", "verb")


def _classification(dataset: str, options: tuple[str, ...], split: str) -> list[Example]:
    """A built-in classification dataset as examples, ``{options}`` written as an instruction stream writes
    them (metalm.training.config.OPTIONS_JOINER)."""
    from metalm.data.builtin import load_builtin

    joined = ", ".join(options)
    return [
        Example(
            id=r.id or f"{dataset}/{split}/{i}",
            fields={"text": " ".join(r.text.split()), "options": joined},
            answers=(r.label,),
        )
        for i, r in enumerate(load_builtin(dataset, split))
    ]


def _ranked_and_flan(
    name: str,
    load: Callable[[str], list[Example]],
    options: tuple[str, ...],
    prompt: str,
    flan: str,
    what: str,
) -> dict[str, Callable[[], Task]]:
    """A classification task in two layouts: ``name`` ranks the options after a decoder ``prompt`` (single-task
    finetuning, in-context learning); ``name-options`` writes them into a FLAN-style input ``flan`` and is
    scored by exact match of a greedy answer (multitask finetuning), as for the BBC topics."""
    common = {
        "load": load,
        "options": options,
        "metric": "accuracy",
        "truncate_field": "text",
        "truncate_words": 64,
    }
    return {
        name: lambda: Task(
            name=name, input_template="{text}", decoder_prompt=prompt, description=f"{what}, ranked", **common
        ),
        f"{name}-options": lambda: Task(
            name=f"{name}-options", input_template=flan, scoring="generate", max_new_tokens=4,
            description=f"{what}, FLAN-style (options in the encoded input), greedy answer", **common,
        ),
    }  # fmt: skip


def _lexical_tasks() -> dict[str, Callable[[], Task]]:
    """WordNet categories and GCIDE parts of speech (docs/data.md), each in both layouts."""
    return {
        **_ranked_and_flan(
            "wordnet-category",
            functools.partial(_classification, "wordnet_category", WORDNET_CATEGORIES),
            WORDNET_CATEGORIES,
            "category:",
            "What kind of thing does this definition describe? {text} OPTIONS: {options} TARGET:",
            "WordNet noun gloss -> one of 10 lexicographer categories",
        ),
        **_ranked_and_flan(
            "gcide-pos",
            functools.partial(_classification, "gcide_pos", GCIDE_POS_LABELS),
            GCIDE_POS_LABELS,
            "part of speech:",
            "Which part of speech is the word this definition defines? {text} OPTIONS: {options} TARGET:",
            "GCIDE definition -> part of speech of the defined word (4 classes)",
        ),
    }


def _image_tasks() -> dict[str, Callable[[], Task]]:
    return {
        "easyvqa": lambda: Task(
            name="easyvqa",
            load=_easyvqa,
            # The question is encoded with the image; the answer cue is decoder text, as in training
            # ([image] Enc("question: Q") answer: A); few-shot uses the paper's capitalised prompt.
            input_template=DEFAULT_LAYOUTS.vqa.template,
            decoder_prompt=DEFAULT_LAYOUTS.vqa.prompt,
            fewshot_input_template="Question: {question}",
            fewshot_decoder_prompt="Answer:",
            layout="vqa",
            scoring="generate",
            metric="vqa_accuracy",
            max_new_tokens=5,
            description="easy-VQA, open-ended greedy answers, VQA accuracy (the paper's zero/few-shot VQA)",
        ),
        "easyvqa-caption": lambda: Task(
            name="easyvqa-caption",
            load=_easyvqa_caption,
            input_template=CAPTION_INSTRUCTION,
            scoring="generate",
            metric="caption",
            max_new_tokens=20,
            description="easy-VQA images, zero-shot captioning with 'Summarize this image:', CIDEr + BLEU-4",
        ),
        "easyvqa-caption-image": lambda: Task(
            name="easyvqa-caption-image",
            load=_easyvqa_caption,
            # The image alone, as in image–caption pre-training with an empty encoded prefix: captioning
            # with no instruction the small models here have never read.
            input_template="",
            layout="caption",
            scoring="generate",
            metric="caption",
            max_new_tokens=20,
            description="easy-VQA images, captioning from the image alone (no prompt), CIDEr + BLEU-4",
        ),
    }


def _speech_tasks() -> dict[str, Callable[[], Task]]:
    return {
        "speech-transcribe": lambda: Task(
            name="speech-transcribe",
            load=_transcribe,
            # The clip alone, as in speech-transcript pre-training with an empty encoded prefix.
            input_template="",
            scoring="generate",
            metric="wer",
            max_new_tokens=40,
            demo_split=None,
            description="speech_bbc (espeak-ng BBC sentences), transcription from the clip alone; word error rate",
        ),
        "easyvqa-spoken": lambda: Task(
            name="easyvqa-spoken",
            load=_spoken_vqa,
            # [image] [spoken question] answer: A, as speech_easy_vqa trains: the clip is the question.
            input_template="",
            decoder_prompt=DEFAULT_LAYOUTS.vqa.prompt,
            scoring="generate",
            metric="vqa_accuracy",
            max_new_tokens=5,
            description="speech_easy_vqa: image + spoken question -> open-ended answer; VQA accuracy",
        ),
        "easyvqa-spoken-typed": lambda: Task(
            name="easyvqa-spoken-typed",
            load=functools.partial(_spoken_vqa, spoken=False),
            # The same questions typed, in easyvqa's protocol: what the spoken accuracy is measured against.
            input_template=DEFAULT_LAYOUTS.vqa.template,
            decoder_prompt=DEFAULT_LAYOUTS.vqa.prompt,
            layout="vqa",
            scoring="generate",
            metric="vqa_accuracy",
            max_new_tokens=5,
            description="speech_easy_vqa's questions typed (easyvqa's protocol): the typed baseline of easyvqa-spoken",
        ),
    }


def _text_tasks() -> dict[str, Callable[[], Task]]:
    return {
        "bbc-topic": lambda: Task(
            name="bbc-topic",
            load=_bbc_topic,
            # The article is encoded; "topic:" and the label are decoder text, as in the training documents
            # "<article>\ntopic: <label>".
            input_template="{text}",
            decoder_prompt="topic:",
            scoring="rank",
            normalization="sum",
            options=BBC_TOPICS,
            metric="accuracy",
            truncate_field="text",
            truncate_words=64,
            description="BBC News topic classification by ranking the 5 topics; accuracy + macro-F1",
        ),
        "bbc-topic-options": lambda: Task(
            name="bbc-topic-options",
            load=_bbc_topic,
            # The instruction layout of configs/finetune-multitask.yaml (FLAN style, options written into the
            # encoded input, nothing in the decoder before the answer); scored as the paper scores its
            # multitask-finetuned multiple-choice tasks: exact match of an unconstrained greedy answer.
            input_template="{text} OPTIONS: {options} TARGET:",
            scoring="generate",
            options=BBC_TOPICS,
            metric="accuracy",
            max_new_tokens=4,
            truncate_field="text",
            truncate_words=64,
            description="BBC News topics, options written into the encoded input, greedy answer; accuracy + macro-F1",
        ),
    }


def _fastbind(attribute: str, ways: int, made_up: bool) -> Task:
    from metalm.evaluation.fastbind import fastbind_task

    return fastbind_task(attribute, ways, made_up=made_up)


def _fastbind_tasks() -> dict[str, Callable[[], Task]]:
    """Fast binding (metalm.evaluation.fastbind): made-up names, and the same episodes with real names."""
    sets = (("shape", 2), ("color", 2), ("color", 5))  # fastbind.FASTBIND_SETS (imported lazily: a cycle)
    return {
        f"fastbind-{a}-{w}way{suffix}": (lambda a=a, w=w, m=not suffix: _fastbind(a, w, m))
        for a, w in sets
        for suffix in ("", "-real")
    }


def _builtin_tasks() -> dict[str, Callable[[], Task]]:
    return {**_image_tasks(), **_fastbind_tasks(), **_speech_tasks(), **_text_tasks(), **_lexical_tasks()}


BUILTIN_TASKS: tuple[str, ...] = tuple(_builtin_tasks())


def builtin_task(name: str) -> Task:
    """A fresh built-in task by name (see :data:`BUILTIN_TASKS`)."""
    tasks = _builtin_tasks()
    if name not in tasks:
        raise TaskError(
            f"unknown task {name!r}; built-in tasks: {', '.join(tasks)} (or give a .yaml/.json task file)"
        )
    return tasks[name]()


def get_task(spec: str | Path | Task) -> Task:
    """A task from a built-in name, a task file path (.yaml / .yml / .json) or a :class:`Task`."""
    if isinstance(spec, Task):
        return spec
    text = str(spec)
    if text in BUILTIN_TASKS:
        return builtin_task(text)
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") or Path(text).is_file():
        return load_task_file(text)
    return builtin_task(text)  # raises with the list of names


# ---------------------------------------------------------------------------------------------------------
# User tasks: a JSONL data file + a YAML/JSON task file
# ---------------------------------------------------------------------------------------------------------
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

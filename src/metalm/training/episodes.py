"""In-context training rows (``format: in_context``): several examples of one stream in one window.

A model that has only seen one image, question and answer per sequence treats demonstrations as noise
(the quickstart: easy-VQA 94 % at k = 0, 43 % at k = 4). An in-context row lays ``k`` demonstrations and a
query into one window that attends across them, in exactly the layout evaluation uses for demonstrations::

    [BOS] [image_1] Enc(question: q_1) answer: a_1 [EOS] ... [image_q] Enc(question: q) answer: a [EOS]

Each example is the stream's ordinary instruction sample without its BOS, so the row read up to the
query's ``answer:`` is the k-shot evaluation prompt, and every answer carries the loss: the answer after
``j`` demonstrations trains the j-shot case, so one row trains k = 0 .. k.

Where the demonstrations come from (:class:`InContextSettings`):

- ``same_task``: the share of rows whose demonstrations ask the same question as the query (a VQA stream's
  question text; a classification or caption stream is one task), ``ways`` answer classes per episode, the
  query's class among them and shown at least once when ``k >= 1``: the task can be read off the
  demonstrations. The other rows draw them from the whole stream, as k-shot evaluation does.
- ``relabel``: the share of same-task rows whose answers are replaced, consistently within the row, by made-up words
  (symbol tuning, Wei et al. 2023; Frozen's fast binding, Tsimpoukelli et al. 2021): the answer can then
  only be read from the demonstrations. Those rows train only answers whose word was shown earlier in
  the row. The made-up words are drawn from syllables and never include :data:`HELD_OUT_WORDS`, the
  names the fast-binding evaluation uses, so evaluation words are never seen in training.
- ``other_question``: the share of same-task rows whose demonstrations ask another question than the query
  (a task of the stream none of whose answers is the query's, so not a paraphrase of its question; its
  classes drawn as above and relabelled alike): the query keeps its own, real answer. Without such rows a
  model trained on relabelled rows answers any question with the demonstrations' words (shown shapes named
  by made-up words, then asked a colour: a made-up word).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metalm.data.made_up import HELD_OUT_WORDS, made_up_word
from metalm.data.records import Classification, ImageText, Record, VQAExample

__all__ = [
    "BALANCED_KINDS",
    "HELD_OUT_WORDS",
    "Episode",
    "EpisodeSampler",
    "InContextSettings",
    "balanced_weights",
    "made_up_word",
]


class InContextSettings(BaseModel):
    """How a ``format: in_context`` stream lays out its rows (see :mod:`metalm.training.episodes`).

    ``shots``: demonstrations before the query, drawn uniformly from ``[min, max]`` per row (a row that
    would not fit ``seq_len`` loses its earliest demonstrations); ``seq_len``: the row's decoder positions
    (default ``data.seq_len``; with ``mix: batch`` only this stream's batches are that wide); ``same_task``: the share of rows whose
    demonstrations share the query's task (the rest are drawn from the whole stream); ``ways``: answer
    classes in a same-task row; ``relabel``: the share of same-task rows whose answers become made-up
    words, of the kind ``relabel_words`` names (:func:`made_up_word`); ``other_question``: the share of
    same-task rows whose demonstrations are of another task than the query's; ``query_repeated``: the share
    of same-task rows with the query's own example among their demonstrations; ``balanced_demonstrations``:
    in a balanced stream, whether the other rows' demonstrations are drawn balanced (else as they come)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    shots: tuple[int, int] = Field((0, 4), strict=False)
    same_task: float = Field(0.5, ge=0.0, le=1.0, strict=False)
    ways: tuple[int, int] = Field((2, 5), strict=False)
    relabel: float = Field(0.0, ge=0.0, le=1.0, strict=False)
    relabel_words: Literal["syllables", "letters"] = "syllables"
    other_question: float = Field(0.0, ge=0.0, le=1.0, strict=False)
    query_repeated: float = Field(0.0, ge=0.0, le=1.0, strict=False)
    balanced_demonstrations: bool = True
    seq_len: int | None = Field(None, ge=8)

    @model_validator(mode="after")
    def _ordered(self) -> InContextSettings:
        for key, low in (("shots", 0), ("ways", 1)):
            lo, hi = getattr(self, key)
            if not low <= lo <= hi:
                raise ValueError(f"{key}: expected [min, max] with {low} <= min <= max, got [{lo}, {hi}]")
        return self


# The record kinds with an answer to a task (answer_of, task_of): in-context rows and balancing take them.
BALANCED_KINDS = ("vqa", "classification", "image_text")


def answer_of(rec: Record) -> str:
    """The class a record's answer belongs to (its label, first answer, or caption)."""
    if isinstance(rec, VQAExample):
        return rec.answers[0]
    if isinstance(rec, Classification):
        return rec.label
    if isinstance(rec, ImageText):
        return rec.text
    raise TypeError(f"only {', '.join(BALANCED_KINDS)} records answer a task, not {rec.kind} records")


def task_of(rec: Record) -> str:
    """What makes two records the same task: a VQA question's text; a stream of anything else is one task."""
    return " ".join((rec.question or "").lower().split()) if isinstance(rec, VQAExample) else ""


def balanced_weights(records: Sequence[Record]) -> list[float]:
    """A sampling weight per record (``balance: answers``): within each task, every answer's records weigh
    alike in all, and each task keeps its share of the records."""
    keys = [(task_of(rec), answer_of(rec)) for rec in records]
    counts = Counter(keys)  # records per (task, answer)
    tasks = Counter(task for task, _ in keys)  # records per task
    answers = Counter(task for task, _ in counts)  # distinct answers per task
    return [tasks[task] / (answers[task] * counts[task, answer]) for task, answer in keys]


@dataclass(frozen=True)
class Episode:
    """Demonstrations (record indices, in order) for a query, and the made-up word of each answer class
    when the row is relabelled (else None)."""

    demonstrations: tuple[int, ...]
    words: dict[str, str] | None = None
    other_question: bool = False  # the demonstrations ask another question: the query keeps its answer


class EpisodeSampler:
    """Draws episodes over one stream's records; the index of tasks and classes is built once."""

    def __init__(
        self,
        records: Sequence[Record],
        settings: InContextSettings,
        usable: Sequence[int],
        weights: Sequence[float] | None = None,
    ) -> None:
        self.records = records
        self.settings = settings
        self.usable = list(usable)
        # Per-record weights (a balanced stream): demonstrations drawn from the whole stream follow them,
        # unless they are to come as evaluation draws them.
        weights = weights if settings.balanced_demonstrations else None
        self.cum_weights = list(itertools.accumulate(weights[i] for i in self.usable)) if weights else None
        self.by_class: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i in self.usable:
            task = task_of(records[i])
            self.by_class[task][answer_of(records[i])].append(i)
        self._elsewhere: dict[str, list[str]] = {}  # per answer: the tasks none of whose answers it is

    def _tasks_without(self, answer: str) -> list[str]:
        """The tasks (with classes) none of whose answers is ``answer``: a paraphrase of a question that
        ``answer`` answers is the same task. Worked out once per answer."""
        if answer not in self._elsewhere:
            self._elsewhere[answer] = sorted(t for t, c in self.by_class.items() if c and answer not in c)
        return self._elsewhere[answer]

    def draw(self, query: int, rng: random.Random) -> Episode:
        """An episode for record ``query``, drawn with ``rng`` (a pure function of both)."""
        s = self.settings
        k = rng.randint(*s.shots)
        if rng.random() >= s.same_task:
            pool = self.usable
            if self.cum_weights is not None:
                demos = tuple(rng.choices(pool, cum_weights=self.cum_weights, k=k))
            else:
                demos = tuple(pool[rng.randrange(len(pool))] for _ in range(k))
            return Episode(tuple(d for d in demos if d != query) if len(pool) > 1 else demos)
        relabel = rng.random() < s.relabel
        task = task_of(self.records[query])
        own: str | None = answer_of(self.records[query])
        # Drawn only when asked for, so that rows without the option stay as they were.
        elsewhere = self._tasks_without(own) if s.other_question else []
        other = bool(elsewhere) and rng.random() < s.other_question
        if other:
            task, own = rng.choice(elsewhere), None
        classes = self.by_class[task]
        others = sorted(c for c in classes if c != own)
        ways = min(rng.randint(*s.ways), len(others) + (own is not None))
        chosen = rng.sample(others, ways) if own is None else [own, *rng.sample(others, ways - 1)]
        picks = [own] if k >= 1 and own is not None else []  # the query's class is shown at least once
        picks += [chosen[rng.randrange(ways)] for _ in range(k - len(picks))]
        rng.shuffle(picks)
        # Drawn only when asked for, as above. The first demonstration of the query's class is the query.
        repeated = s.query_repeated > 0 and own in picks and rng.random() < s.query_repeated
        demos = []
        for c in picks:
            if repeated and c == own:
                demos.append(query)
                repeated = False
                continue
            members = classes[c]
            pick = members[rng.randrange(len(members))]
            if pick == query:  # else a query is never its own demonstration
                if len(members) == 1:
                    continue
                pick = members[(members.index(pick) + 1) % len(members)]
            demos.append(pick)
        words = None
        if relabel and ways >= 2:
            names: list[str] = []
            while len(names) < ways:
                word = made_up_word(rng, s.relabel_words)
                if word not in names:
                    names.append(word)
            words = dict(zip(chosen, names))
        return Episode(tuple(demos), words, other)

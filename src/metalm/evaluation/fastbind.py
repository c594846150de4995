"""Fast binding: a few-shot task only in-context learning can solve (after Frozen, Tsimpoukelli et al. 2021).

Each query is an *episode*: ``ways`` classes of one attribute of easy-VQA images (their shape, or their
colour), each class named by a made-up word (``dax``, ``blicket``, ...) that appears only in the
demonstrations; ``k`` demonstrations per class (an image, the attribute's question, the class's word),
shuffled; then a query image of one of the classes and the same question. The model answers by greedy
generation; a prediction is right when it is the query class's word. With no demonstrations the word is
unknowable, so k = 0 is at 0 % by construction and chance with demonstrations is ``1 / ways``; only reading
the demonstrations scores. The ``-real`` variants name each class by its real name (``circle``, ``red``):
episodes drawn the same way (seeded by their own task name), solvable zero-shot by a model that knows the
attribute. The ``-ranked`` variants score the very episodes of their generated task (``same_as``) by
likelihood instead: the answer is whichever of the episode's names the model finds
likeliest after the query, so a model that binds but cannot yet spell an unseen word is told apart from one
that does not bind at all (chance ``1 / ways`` at every k, k = 0 included). The ``-ask-color`` variant shows the
very episodes of its binding task and then asks the query image's *colour* (``ask``): right when the model
answers the real colour, wrong when it answers with a demonstration's word, as a model does that learnt
that demonstrations always ask what the query asks.

Classes, names and demonstrations are drawn per (seed, query index); the names are
:data:`metalm.data.made_up.HELD_OUT_WORDS`, which in-context training (``relabel``) never uses.
Queries come from the test split, demonstrations from the train split. ``k`` (``--shots``) counts
demonstrations *per class*, as in Frozen: 2-way at k = 4 shows 8.

The tasks themselves are rows of the built-in catalogue (``configs/tasks/fastbind.yaml``), which names this
module's reader (:func:`labelled_images`) and episode hook (:func:`episodes_for`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import replace

from metalm.data.made_up import HELD_OUT_WORDS
from metalm.evaluation.protocol import Example

__all__ = ["QUESTIONS", "episodes_for", "labelled_images", "make_episode"]

# The attribute's question, as easy-VQA asks it (so the question is one the model has read).
QUESTIONS = {"shape": "what shape is in the image?", "color": "what color is the shape?"}
_CAPTION = re.compile(r"^a (\w+) (\w+)\.$")


def labelled_images(split: str, attribute: str, *, as_text: bool = False) -> list[Example]:
    """Every easy-VQA image of `split` with its `attribute` (from its caption ``a {color} {shape}.``).

    ``as_text``: the image is replaced by its caption, written before the question ("a blue circle. what
    shape is in the image?"): episodes drawn the same way, with perfect perception, so what is left to measure is
    whether the language model binds made-up names in context at all (the `-text` tasks; for a decoder
    alone, its ceiling on the image tasks)."""
    from metalm.data.builtin import load_builtin

    out = []
    for i, rec in enumerate(load_builtin("easy_vqa_captions", split)):
        match = _CAPTION.match(rec.text)
        if match is None:
            continue
        value = match.group(1) if attribute == "color" else match.group(2)
        question = f"{rec.text} {QUESTIONS[attribute]}" if as_text else QUESTIONS[attribute]
        out.append(
            Example(
                id=rec.id or f"fastbind/{split}/{i}",
                # Both attributes kept (templates read only {question}) for an episode that asks the other.
                fields={"question": question, "color": match.group(1), "shape": match.group(2)},
                answers=(value,),
                image=None if as_text else rec.image,
            )
        )
    return out


def make_episode(
    query: Example, pool: list[Example], k: int, rng: random.Random, *, ways: int, made_up: bool,
    ask: str | None = None,
) -> tuple[list[Example], Example]:  # fmt: skip
    """Demonstrations (``k`` per class, shuffled) and the query, both with their answers renamed; the query's
    options are the episode's names (what the ``-ranked`` tasks choose among). ``ask``: the query is asked
    that attribute instead, its real value the answer (the demonstrations unchanged)."""
    by_class: dict[str, list[Example]] = {}
    for ex in pool:
        by_class.setdefault(ex.answers[0], []).append(ex)
    own = query.answers[0]
    others = sorted(c for c in by_class if c != own)
    classes = [own, *rng.sample(others, ways - 1)]
    rng.shuffle(classes)
    names = dict(zip(classes, rng.sample(HELD_OUT_WORDS, ways))) if made_up else {c: c for c in classes}
    demos = [
        replace(ex, answers=(names[c],))
        for c in classes
        for ex in rng.sample(by_class[c], k)
        if ex.id != query.id
    ]
    rng.shuffle(demos)
    if ask is not None:
        fields = {**query.fields, "question": QUESTIONS[ask]}
        return demos, replace(query, fields=fields, answers=(query.fields[ask],), options=None)
    return demos, replace(query, answers=(names[own],), options=tuple(names[c] for c in classes))


def episodes_for(
    task_name: str, ways: int, *, made_up: bool, ask: str | None = None
) -> Callable[[Example, list[Example], int, int, int], tuple[list[Example], Example]]:
    """The ``Task.episodes`` hook of a fast-binding task (the catalogue's ``episodes: {hook: fastbind}``):
    episodes drawn per (task, seed, query index), so every run of a task shows the same ones."""

    def episodes(
        query: Example, pool: list[Example], k: int, seed: int, index: int
    ) -> tuple[list[Example], Example]:
        rng = random.Random(f"metalm-fastbind/{task_name}/{seed}/{index}")
        return make_episode(query, pool, k, rng, ways=ways, made_up=made_up, ask=ask)

    return episodes

"""Made-up words, and the built-in ``made_up_repeats`` text whose later parts only copying predicts.

In-context training renames answers by made-up words (``relabel``, :mod:`metalm.training.episodes`) and
the fast-binding evaluation names classes by others (:data:`HELD_OUT_WORDS`, Frozen's), never drawn in
training. ``made_up_repeats``: documents of 3-8 made-up words shown three times (``"tokim bavu. tokim
bavu. tokim bavu."``): the first showing is unpredictable, the later ones only copying predicts, the skill
a decoder needs to answer with a name only its demonstrations give (an induction head; Olsson et al. 2022).
"""

from __future__ import annotations

import random
import string

from metalm.data.records import TextDocument
from metalm.data.splits import check_split

__all__ = ["HELD_OUT_WORDS", "REPEATS_SIZES", "made_up_repeats", "made_up_word"]

# The fast-binding evaluation's names (Frozen's and their kind); training's made-up words avoid them.
HELD_OUT_WORDS = ("dax", "blicket", "wug", "zib", "toma", "fep", "kiki", "tufa", "gazzer", "mipen")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "pl", "tr", "sn")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "k", "t", "x", "p", "m")


def made_up_word(rng: random.Random, kind: str = "syllables") -> str:
    """A made-up word, never one of HELD_OUT_WORDS: ``syllables``, pronounceable, of two syllables
    (``"tokim"``); ``letters``, 3-7 letters drawn uniformly (``"qwzbe"``), which no prior over word shapes
    predicts, so that copying the demonstrations' word is the only way to lower the loss on it."""
    while True:
        if kind == "letters":
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        else:
            word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS)
        if word not in HELD_OUT_WORDS:
            return word


REPEATS_SIZES = {"train": 20000, "validation": 500, "test": 500}


def made_up_repeats(split: str) -> list[TextDocument]:
    """The ``made_up_repeats`` documents of ``split``: drawn with a fixed seed per split (a pure function)."""
    check_split(split)
    rng = random.Random(f"made_up_repeats/{split}")
    documents = []
    for i in range(REPEATS_SIZES[split]):
        words = " ".join(made_up_word(rng) for _ in range(rng.randint(3, 8)))
        documents.append(TextDocument(text=f"{words}. {words}. {words}.", id=f"made_up_repeats/{split}/{i}"))
    return documents

"""Downstream tasks and corpus documents from the installed dictionaries: WordNet 3.0 (``wordnet-base``) and
GCIDE (``dict-gcide``).

=====================  =================  ============================================================
name                   record kind        what
=====================  =================  ============================================================
``wordnet_category``   ``classification``  a WordNet noun gloss -> its lexicographer file among the 10
                                           largest (``artifact``, ``person``, ``plant`` ...), balanced
``gcide_pos``          ``classification``  a GCIDE definition (first sense) -> the part of speech of the
                                           word it defines (noun, verb, adjective, adverb), balanced
=====================  =================  ============================================================

Splits follow the pre-training corpus (``metalm.data.corpus``): a WordNet synset goes with its corpus document
(a run of up to ``WORDNET_DOC_SYNSETS`` consecutive synsets of one lexicographer file, split key
``wordnet/<pos>/<offset of the first>``) and a GCIDE definition with its headword's document (split key
``gcide/<headword>``), so no validation or test example is in the pre-training text. Classes are balanced per
split by keeping, for each class, as many examples as the rarest class has (evenly spaced, in file order).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from metalm.data.gcide import GCIDE_DICT, clean_gcide_entry, gcide_entries
from metalm.data.records import Classification, TextDocument
from metalm.data.splits import CORPUS_SPLIT, split_of
from metalm.data.text_files import read_text_file

__all__ = [
    "GCIDE_POS",
    "WORDNET_CATEGORIES_N",
    "WORDNET_DOC_SYNSETS",
    "Synset",
    "balanced",
    "gcide_definitions",
    "gcide_pos",
    "wordnet_category",
    "wordnet_documents",
    "wordnet_synsets",
]

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
# WordNet 3.0's lexicographer files in file-number order (the `lexnames` file, which wordnet-base lacks).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
WORDNET_CATEGORIES_N = 10  # the largest noun lexicographer files become the classes
WORDNET_DOC_SYNSETS = 16  # synsets per corpus document
# GCIDE part-of-speech abbreviations -> label.
GCIDE_POS = {
    "n": "noun",
    "v. t": "verb",
    "v. i": "verb",
    "v": "verb",
    "a": "adjective",
    "adj": "adjective",
    "adv": "adverb",
}
DEFINITION_WORDS = 48  # a GCIDE definition is cut to its first sense and at most this many words


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: its words (underscores as spaces), lexicographer file and gloss."""

    pos: str
    offset: str
    lexname: str
    words: tuple[str, ...]
    gloss: str


def _synset_line(pos: str, line: str) -> Synset:
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    n_words = int(fields[3], 16)
    words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
    words = tuple(re.sub(r"\([a-z]+\)$", "", w) for w in words)  # adjective markers: "big(a)"
    return Synset(pos, fields[0], LEXNAMES[int(fields[1])], words, gloss.strip())


@lru_cache(maxsize=4)
def wordnet_synsets(pos: str = "noun", folder: Path = WORDNET_DIR) -> tuple[Synset, ...]:
    """Every synset of ``data.<pos>`` in file order (licence header lines skipped)."""
    path = folder / f"data.{pos}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install wordnet-base")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return tuple(_synset_line(pos, line) for line in fh if not line.startswith("  "))


def _wordnet_groups(pos: str, folder: Path) -> Iterator[tuple[str, list[Synset]]]:
    """(split key, synsets) of each corpus document: runs of consecutive synsets of one lexicographer file."""
    run: list[Synset] = []
    for synset in wordnet_synsets(pos, folder):
        if run and (len(run) == WORDNET_DOC_SYNSETS or synset.lexname != run[0].lexname):
            yield f"wordnet/{pos}/{run[0].offset}", run
            run = []
        run.append(synset)
    if run:
        yield f"wordnet/{pos}/{run[0].offset}", run


def wordnet_documents(folder: Path = WORDNET_DIR) -> Iterator[TextDocument]:
    """Corpus documents: each synset as ``"<words>: <gloss>"`` on its own line, ``WORDNET_DOC_SYNSETS`` per
    document; the lexicographer file (the ``wordnet_category`` label) is not written."""
    for pos in WORDNET_POS:
        for key, run in _wordnet_groups(pos, folder):
            text = "\n".join(f"{', '.join(s.words)}: {s.gloss}" for s in run)
            yield TextDocument(text=text, id=key)


def balanced(records: list[Classification]) -> list[Classification]:
    """As many records of each label as the rarest label has, evenly spaced in the given order; the result
    keeps that order."""
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r.label, []).append(i)
    n = min(len(v) for v in by_label.values()) if by_label else 0
    keep = {idx[j * len(idx) // n] for idx in by_label.values() for j in range(n)}
    return [r for i, r in enumerate(records) if i in keep]


def wordnet_category(split: str, folder: Path = WORDNET_DIR) -> list[Classification]:
    """WordNet noun gloss -> lexicographer file (``noun.`` dropped) among the ``WORDNET_CATEGORIES_N``
    largest, balanced, in file order; ids ``wordnet/noun/<offset>``."""
    sizes: dict[str, int] = {}
    for s in wordnet_synsets("noun", folder):
        sizes[s.lexname] = sizes.get(s.lexname, 0) + 1
    classes = set(sorted(sizes, key=lambda k: (-sizes[k], k))[:WORDNET_CATEGORIES_N])
    out = [
        Classification(text=s.gloss, label=s.lexname.split(".", 1)[1], id=f"wordnet/noun/{s.offset}")
        for key, run in _wordnet_groups("noun", folder)
        if split_of(key, *CORPUS_SPLIT) == split
        for s in run
        if s.lexname in classes
    ]
    return balanced(out)


# --------------------------------------------------------------------------------------------
# GCIDE: definition -> part of speech

_POS_HEAD = re.compile(r"^[^,]{1,60}?\s*,\s*(n|v\. ?[ti]|v|a|adj|adv)\.\s*(.*)$", re.S)
_LEADING_NOTES = re.compile(r"^(\s*(\[[^\]]*\]|\([A-Z][^)]{0,30}\)|;|[A-Z][a-z]{0,8}\.(?=\s)))+\s*")


def gcide_definitions(text: str) -> Iterator[tuple[str, str, str]]:
    """(headword lower-cased, part of speech, first definition) of every GCIDE entry whose part of speech
    is a plain noun, verb, adjective or adverb; the definition loses its etymology, usage labels and any
    later senses, and is cut to ``DEFINITION_WORDS`` words."""
    for head, entry in gcide_entries(text):
        cleaned = " ".join(clean_gcide_entry(entry).split())
        found = _POS_HEAD.match(cleaned)
        if not found:
            continue
        pos = GCIDE_POS.get(re.sub(r"\.\s*", ". ", found.group(1)))  # "v.t" and "v. t" alike
        body = _LEADING_NOTES.sub("", found.group(2))
        body = re.sub(r"^(1\.|pl\.)\s*", "", body)
        # The first sense ends at the second, a quotation, a synonym list or a bracketed note.
        body = re.split(r"\s2\.\s|\s--\s?[A-Z]|\sSyn:|\s?\[", body, maxsplit=1)[0]
        body = re.sub(r"\s[A-Z]$", "", body.strip())
        words = body.split()
        if pos is None or len(words) < 3:
            continue
        yield head.lower(), pos, " ".join(words[:DEFINITION_WORDS])


@lru_cache(maxsize=2)
def _gcide_definitions_of(path: Path) -> tuple[tuple[str, str, str], ...]:
    return tuple(gcide_definitions(read_text_file(path)))


def gcide_pos(split: str, path: Path | None = None) -> list[Classification]:
    """GCIDE definition -> part of speech (noun, verb, adjective, adverb), balanced, in dictionary order;
    ids ``gcide/<headword>/<n>``. Definitions that name their headword are left out (they give it away)."""
    out: list[Classification] = []
    seen: dict[str, int] = {}
    for head, pos, definition in _gcide_definitions_of(path or GCIDE_DICT):
        n = seen[head] = seen.get(head, -1) + 1
        if split_of(f"gcide/{head}", *CORPUS_SPLIT) != split or head in definition.lower():
            continue
        out.append(Classification(text=definition, label=pos, id=f"gcide/{head}/{n}"))
    return balanced(out)

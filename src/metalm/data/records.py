"""Tokenizer-agnostic data records and the JSONL format that stores them.

One JSON object per line; a ``kind`` field says what the record is (see ``docs/data.md``)::

    {"kind": "text", "text": "..."}
    {"kind": "image_text", "image": "images/0.png", "text": "..."}
    {"kind": "audio_text", "audio": "clips/0.wav", "text": "..."}
    {"kind": "interleaved", "content": [{"type": "text", "text": "..."}, {"type": "image", "image": "..."},
                                        {"type": "audio", "audio": "..."}]}
    {"kind": "vqa", "image": "...", "question": "...", "answers": ["..."]}
    {"kind": "vqa", "image": "...", "audio": "question.wav", "answers": ["..."]}   (a spoken question)
    {"kind": "classification", "text": "...", "label": "..."}
    {"kind": "classification", "audio": "...", "label": "..."}                     (spoken text)

Records carry raw text and *unresolved* image and audio references (an absolute path, or a ``data:`` URL
kept verbatim); tokenization and decoding happen later, once per record, elsewhere.
:func:`read_jsonl` streams a file line by line and raises :class:`RecordError` naming the file,
line and field of the first bad record, or skips and counts bad records into a :class:`SkipReport`.

Each kind is declared once, as a pydantic model that both parses a line and is the record
(:mod:`metalm.data.record_kinds`); :mod:`metalm.data.record_parsing` turns a JSON object into one and its
errors into messages; :mod:`metalm.data.record_io` reads and writes files. This module gathers them.
"""

from __future__ import annotations

from metalm.data.record_io import MAX_LINE_BYTES, read_jsonl, read_records, validate_file, write_jsonl
from metalm.data.record_kinds import (
    KINDS,
    AudioPart,
    AudioText,
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    Record,
    TextDocument,
    TextPart,
    VQAExample,
)
from metalm.data.record_parsing import RecordError, SkipReport, parse_record, record_to_dict

__all__ = [
    "KINDS",
    "MAX_LINE_BYTES",
    "AudioPart",
    "AudioText",
    "Classification",
    "ImagePart",
    "ImageText",
    "Interleaved",
    "Record",
    "RecordError",
    "SkipReport",
    "TextDocument",
    "TextPart",
    "VQAExample",
    "parse_record",
    "read_jsonl",
    "read_records",
    "record_to_dict",
    "validate_file",
    "write_jsonl",
]

"""GCIDE (the 1913 Webster plus later additions, in dictd's text format): its entries as plain text. Read by
the text corpus (:mod:`metalm.data.corpus`, one document per headword) and the part-of-speech task
(:mod:`metalm.data.lexical`), which import it rather than each other."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["GCIDE_DICT", "clean_gcide_entry", "gcide_entries"]

GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")

_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\\s*(\([^)\n]*\)\s*)?")  # \Ab"a*ca\ ([a^]b"[.a]*k[.a])
_SOURCE_TAG = re.compile(
    r"\[(?:1913 Webster|Webster 1913[^\]]*|PJC|WordNet[^\]]*|[A-Z]{2,4}|Century[^\]]*)\]"
)
_ACCENT = re.compile(r"\[([=.^`'\"~]?)([a-zA-Z]{1,2})([=.^`'\"~]?)\]")  # [=a] [a^] [ae] -> a, a, ae
_BRACES = re.compile(r"[{}]")


def gcide_entries(text: str) -> Iterator[tuple[str, str]]:
    """(headword, raw entry) of each entry in dictd text: an entry starts at an unindented line; the
    database's own header entries (``00-database-...``) are skipped."""
    head, lines = None, []
    for line in text.splitlines():
        if line and not line[0].isspace():
            if head is not None and not head.startswith("00"):
                yield head, "\n".join(lines)
            head, lines = line.split(" \\", 1)[0].split(",", 1)[0].strip(), [line]
        elif head is not None:
            lines.append(line)
    if head is not None and not head.startswith("00"):
        yield head, "\n".join(lines)


def clean_gcide_entry(entry: str) -> str:
    """One entry as plain text: pronunciations, source tags and cross-reference braces removed, accented
    letters written plainly, lines re-flowed into paragraphs."""
    text = _PRONUNCIATION.sub("", entry, count=1)
    text = _SOURCE_TAG.sub("", text)
    text = _ACCENT.sub(r"\2", text)
    text = _BRACES.sub("", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n".join(p for p in paragraphs if p)

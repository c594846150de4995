"""Reading the installed packages' text files (documentation, dictionaries), compressed or not: shared by the
text corpus (:mod:`metalm.data.corpus`) and the lexical tasks (:mod:`metalm.data.lexical`)."""

from __future__ import annotations

import gzip
from pathlib import Path

__all__ = ["read_text_file"]


def read_text_file(path: Path) -> str:
    """A text file of a package, gzip (``.gz``) or dictzip (``.dz``) compressed or not; bad bytes replaced."""
    # dictzip (.dz) is gzip with an index in its header: gzip reads it.
    raw = gzip.decompress(path.read_bytes()) if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")

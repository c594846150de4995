"""``validation_fraction``: a seeded validation split held out of one records file.

Records that share an image are one unit (a VQA file asks several questions of each image; a caption file
may caption an image twice), so no image is in both splits and validation measures images the model has
not trained on. Records without an image are units of their own, by ``id`` when they have one, else by
content. A unit's place is decided by a hash of (seed, unit key): the same on every machine and process,
independent of the file's order, and adding records does not move the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from metalm.data.records import Record, record_to_dict

__all__ = ["holdout_key", "split_holdout"]


def holdout_key(record: Record) -> str:
    """What keeps records together: the image, else the id, else the record's content."""
    image = getattr(record, "image", None)
    if image is not None:
        return f"image:{image}"
    parts = getattr(record, "parts", ())
    images = [p.image for p in parts if getattr(p, "image", None) is not None]
    if images:  # an interleaved record: its first image
        return f"image:{images[0]}"
    if record.id is not None:
        return f"id:{record.id}"
    return "content:" + repr(sorted(record_to_dict(record).items()))


def split_holdout(
    records: Sequence[Record], fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): round(fraction x units) units, at least one, held out, and at
    least one unit left for training. Record order is kept within each part."""
    keys = [holdout_key(r) for r in records]
    units = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if len(units) < 2:
        raise ValueError(f"validation_fraction needs at least two distinct images/records, got {len(units)}")
    count = min(len(units) - 1, max(1, round(fraction * len(units))))
    held = set(units[:count])
    train = [r for r, k in zip(records, keys) if k not in held]
    return train, [r for r, k in zip(records, keys) if k in held]

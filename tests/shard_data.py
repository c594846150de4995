"""Tiny sharded data sets for the tests and the benchmark: WebDataset tar shards laid out as img2dataset
writes them (NNNNN.jpg + NNNNN.txt + NNNNN.json), and Parquet files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = "red blue green circle square triangle small large bright dark".split()


def tiny_jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.kron(
        rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), np.ones((size // 4, size // 4, 1), np.uint8)
    )
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def caption(i: int) -> str:
    return f"a {WORDS[i % 10]} {WORDS[(i // 10) % 10]} {WORDS[(i // 100) % 10]} shape number {i}"


def write_webdataset(folder: Path, shards: int, per_shard: int, *, images: int = 16) -> list[str]:
    """`shards` tar files of `per_shard` pairs each, keys 000000000... (the img2dataset layout); the JPEGs
    cycle through `images` distinct pictures. Returns the keys in order."""
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = [tiny_jpeg(i) for i in range(images)]
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{i:09d}"
                meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "width": 64}
                for ext, data in (
                    ("jpg", jpegs[i % images]),
                    ("txt", caption(i).encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
    return keys


def write_parquet(folder: Path, shards: int, per_shard: int, *, kind: str = "text") -> list[str]:
    """Parquet shards: `text` rows (column ``body``, id ``doc_id``) or `image_text` rows (``png`` bytes,
    ``caption``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for s in range(shards):
        rows = range(s * per_shard, (s + 1) * per_shard)
        if kind == "text":
            table = pa.table(
                {
                    "doc_id": [f"d{i}" for i in rows],
                    "body": [" ".join([caption(i)] * (1 + i % 5)) for i in rows],
                }
            )
        else:
            table = pa.table(
                {
                    "key": [f"p{i}" for i in rows],
                    "png": [tiny_jpeg(i) for i in rows],
                    "caption": [caption(i) for i in rows],
                }
            )
        pq.write_table(table, folder / f"part-{s:03d}.parquet")
        ids += [f"d{i}" if kind == "text" else f"p{i}" for i in rows]
    return ids

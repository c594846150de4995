"""Writing records as shards that a training stream reads as it streams (:mod:`metalm.data.shards`):
WebDataset tar shards in the img2dataset layout (``NNNNNNNNN.jpg`` + ``.txt`` + ``.json``) or Parquet files
whose columns are the record fields (``image`` as encoded bytes). ``metalm data export --format`` uses it."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from metalm.data.images import _decode_data_url
from metalm.data.records import Classification, ImageText, Record, TextDocument, VQAExample

__all__ = ["SHARD_WRITE_FORMATS", "write_shards"]

SHARD_WRITE_FORMATS = ("webdataset", "parquet")


def _image_bytes(ref: str | bytes) -> tuple[bytes, str]:
    """Encoded bytes of an image reference and the file extension they go under."""
    if isinstance(ref, bytes):
        return ref, "jpg"
    if ref[:5].lower() == "data:":
        media = ref[5:].split(";", 1)[0].split("/")[-1].lower()
        return _decode_data_url(ref, "data URL", 20_000_000), {"jpeg": "jpg"}.get(media, media or "jpg")
    suffix = Path(ref).suffix.lower().lstrip(".")
    return Path(ref).read_bytes(), {"jpeg": "jpg"}.get(suffix, suffix or "jpg")


def _row(record: Record) -> dict:
    """A record as a row of its fields (``image``: encoded bytes)."""
    if isinstance(record, TextDocument):
        return {"id": record.id, "text": record.text}
    if isinstance(record, ImageText):
        return {"id": record.id, "image": _image_bytes(record.image)[0], "text": record.text}
    if isinstance(record, VQAExample):
        row = {"id": record.id, "image": _image_bytes(record.image)[0], "question": record.question}
        return {**row, "answers": list(record.answers)}
    if isinstance(record, Classification):
        return {"id": record.id, "text": record.text, "label": record.label}
    raise ValueError(
        f"{record.kind} records cannot be written as shards (text, image_text, vqa, classification)"
    )


def _tar_members(record: Record, key: str) -> Iterator[tuple[str, bytes]]:
    meta = {"key": key, "id": record.id}
    if isinstance(record, ImageText | VQAExample):
        data, ext = _image_bytes(record.image)
        yield f"{key}.{ext}", data
    if isinstance(record, VQAExample):
        meta.update(question=record.question, answers=list(record.answers))
    if isinstance(record, Classification):
        meta["label"] = record.label
    if isinstance(record, TextDocument | ImageText | Classification):
        yield f"{key}.txt", record.text.encode("utf-8")
    yield f"{key}.json", json.dumps(meta).encode("utf-8")


def _write_tar(records: list[Record], path: Path, first: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i, record in enumerate(records):
            for name, data in _tar_members(record, f"{first + i:09d}"):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(records: list[Record], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(r) for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_shards(
    records: Iterable[Record], out_dir: str | Path, *, fmt: str, per_shard: int, prefix: str
) -> list[Path]:
    """Write `records` as ``<out_dir>/<prefix>-NNNNN.tar`` (or ``.parquet``) of `per_shard` records each;
    returns the shard paths. A VQA or classification tar shard keeps question/answers/label in its JSON
    member (read them with ``fields: {question: json.question, ...}``)."""
    if fmt not in SHARD_WRITE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SHARD_WRITE_FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = iter(records)
    paths, written = [], 0
    while chunk := list(islice(it, per_shard)):
        path = out / f"{prefix}-{len(paths):05d}.{'tar' if fmt == 'webdataset' else 'parquet'}"
        if fmt == "webdataset":
            _write_tar(chunk, path, written)
        else:
            _write_parquet(chunk, path)
        paths.append(path)
        written += len(chunk)
    return paths

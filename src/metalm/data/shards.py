"""Sharded record sources read as streams, never loaded whole: WebDataset tar shards (``img2dataset``
output as it is: ``NNNNN.jpg`` + ``NNNNN.txt`` + ``NNNNN.json``), Parquet files, JSONL files and Hugging
Face dataset folders, all through Hugging Face ``datasets`` streaming (one reader for the four formats,
``split_dataset_by_node`` and an exact ``state_dict``; docs/data.md has the measurements behind the choice).

A source is a shard pattern (``data/cc3m/{00000..00331}.tar``, ``shards/*.parquet``), one ``.tar`` or
``.parquet`` file, or a folder of them. :class:`ShardReader` reads one process's part of it:

- **which shards**: each epoch the shard list is permuted with a seeded RNG (the same on every process),
  then ``split_dataset_by_node`` gives process ``r`` of ``N`` the shards ``r, r+N, ...`` of that order
  (when the shard count is not a multiple of ``N``, every process reads every shard and keeps every
  ``N``-th record: still each record once, at ``N`` times the reading cost; a warning says so).
- **order**: records are read in blocks of ``buffer`` consecutive records, each block permuted with a seeded
  RNG (seed, stream, process, epoch, block). Memory is one block.
- **position**: where a block starts is the ``datasets`` state at that point; the reader's state is that
  plus how many records of the block were read, so it resumes exactly (``datasets`` itself refills its own
  shuffle buffer from scratch on resume, which is why the buffer is ours).

Rows become records (:mod:`metalm.data.records`) by a field mapping from record fields to columns; left
out, the usual columns are looked for (``jpg``/``png``/``image``, ``txt``/``text``/``caption``, ``__key__``/
``key``/``id``...).
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metalm.data.records import Classification, ImageText, Record, RecordError, TextDocument, VQAExample

__all__ = [
    "SHARD_FORMATS",
    "ShardReader",
    "expand_source",
    "is_sharded_source",
    "is_webdataset",
    "row_to_record",
]

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that streams it.
SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# Streamed without asking: the formats that only exist as shards (JSONL files stay in memory unless a
# pattern or `streaming: true` names them; that is how they were read before).
ALWAYS_STREAMED = (".tar", ".parquet")
# Record field -> the columns tried in order when the mapping leaves it out.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "image"),
    "text": ("txt", "text", "caption"),
    "id": ("__key__", "key", "id"),
    "question": ("question", "json.question"),
    "answers": ("answers", "answer", "json.answers"),
    "label": ("label", "cls", "json.label"),
}
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "image_text": ("image", "text"),
    "vqa": ("image", "question", "answers"),
    "classification": ("text", "label"),
}


def _is_pattern(source: str) -> bool:
    return any(ch in source for ch in "*?[{")


def _hf_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def is_sharded_source(source: str, streaming: bool | None = None) -> bool:
    """Is `source` read as a stream of shards? A pattern, a ``.tar``/``.parquet`` file or a folder of them
    always is; a JSONL file/folder or an HF dataset folder only with ``streaming: true``."""
    if streaming is not None:
        return streaming
    if _is_pattern(source):
        return True
    path = Path(source)
    if path.is_dir() and not _hf_folder(path):
        return any(p.suffix in ALWAYS_STREAMED for p in path.iterdir())
    return path.suffix in ALWAYS_STREAMED


def expand_source(source: str) -> list[str]:
    """The shard files of `source` (brace ranges and globs expanded, a folder's shard files), or ``[folder]``
    for an HF dataset folder. Raises FileNotFoundError when nothing matches."""
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise ValueError(f"{source}: sharded sources need pip install 'metalm[shards]'") from None
    path = Path(source)
    if _hf_folder(path):
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in SHARD_FORMATS and p.is_file())
    else:
        files = []
        for pattern in braceexpand(source):
            found = sorted(glob.glob(pattern)) if _is_pattern(pattern) else [pattern]
            files += [f for f in found if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"{source}: no shard files (.tar, .parquet, .jsonl) match")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or not suffixes <= set(SHARD_FORMATS):
        raise ValueError(
            f"{source}: shards must be all of one format ({', '.join(SHARD_FORMATS)}), got {suffixes}"
        )
    return files


def is_webdataset(source: str) -> bool:
    """Are `source`'s shards WebDataset tar files? (False when it matches nothing.)"""
    try:
        return Path(expand_source(source)[0]).suffix == ".tar"
    except (FileNotFoundError, ValueError):
        return source.endswith(".tar")


# --------------------------------------------------------------------------------------------
# Rows -> records


def _column(row: dict[str, Any], field: str, fields: dict[str, str]) -> Any:
    """The value of record field `field` in `row`: from the mapped column, else the first default present."""
    for column in (fields[field],) if field in fields else DEFAULT_COLUMNS.get(field, ()):
        value: Any = row
        for part in column.split("."):  # "json.caption": a key inside a JSON column
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _image_value(value: Any, base: Path) -> bytes | str:
    """Encoded image bytes (tar members, HF ``Image`` columns) or an image path (relative to `base`)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str) and value:
        return value if value[:5].lower() == "data:" or os.path.isabs(value) else str(base / value)
    raise ValueError("expected encoded image bytes or an image path")


def _text_value(value: Any, field: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected non-empty text in {field!r}")
    return value


def row_to_record(row: dict[str, Any], kind: str, fields: dict[str, str], base: Path) -> Record:
    """One streamed row as a record of `kind`. Raises RecordError naming the field (and the column)."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"sharded sources hold records of kind {', '.join(KIND_FIELDS)}, not {kind!r}")
    values: dict[str, Any] = {}
    for field in KIND_FIELDS[kind]:
        value = _column(row, field, fields)
        where = fields.get(field, "/".join(DEFAULT_COLUMNS.get(field, (field,))))
        try:
            if value is None:
                raise ValueError(f"missing (columns: {', '.join(sorted(row))})")
            if field == "image":
                values[field] = _image_value(value, base)
            elif field == "answers":
                answers = [value] if isinstance(value, str) else list(value)
                values[field] = tuple(_text_value(a, field) for a in answers)
            else:
                values[field] = _text_value(value, field)
        except (ValueError, UnicodeDecodeError) as err:
            raise RecordError(f"{err}", field=f"{field} (column {where})") from None
    rid = _column(row, "id", fields)
    rid = str(rid) if rid is not None else None
    if kind == "text":
        return TextDocument(values["text"], id=rid)
    if kind == "image_text":
        return ImageText(values["image"], values["text"], id=rid)  # image: bytes or a path
    if kind == "vqa":
        return VQAExample(values["image"], values["question"], values["answers"], id=rid)
    return Classification(values["text"], values["label"], id=rid)


# --------------------------------------------------------------------------------------------
# Reading one process's part


class ShardReader:
    """One process's records of a sharded source, endless (epoch after epoch), in seeded blocks. ``read()``
    gives ``(index, row)``: index counts this process's reads from 0. See the module docstring."""

    def __init__(
        self,
        source: str,
        *,
        name: str,
        seed: int,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        buffer: int = 1000,
    ) -> None:
        self.files = expand_source(source)
        self.source = source
        self.name = name
        self.seed = seed
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.buffer = max(1, buffer)
        self.base_dir = Path(self.files[0]).parent
        if len(self.files) % world_size and not _hf_folder(Path(self.files[0])):
            logger.warning(
                "%s: %d shards for %d processes: every process reads every shard and keeps every %d-th "
                "record (use a multiple of %d shards to read each shard once)",
                source, len(self.files), world_size, world_size, world_size,
            )  # fmt: skip
        self.next_index = 0
        self.epoch = 0
        self._block: list[dict[str, Any]] = []
        self._block_pos = 0
        self._start: dict[str, Any] = {"epoch": 0, "block": 0, "base": 0, "hf": None}
        self._starts: list[dict[str, Any]] = [self._start]  # block starts that a replay may need
        self._blocks: Iterator[tuple[dict[str, Any], list[dict[str, Any]]]] | None = None

    # --- the datasets side ------------------------------------------------------------------------------
    def _epoch_dataset(self, epoch: int):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{self.source}: sharded sources need pip install 'metalm[shards]'") from None
        from datasets.distributed import split_dataset_by_node

        files = list(self.files)
        random.Random(f"{self.seed}:{self.split}:{self.name}:shards:{epoch}").shuffle(files)
        if _hf_folder(Path(files[0])):
            table = datasets.load_from_disk(files[0])
            ds = table.to_iterable_dataset(num_shards=max(1, len(table.cache_files)))
        else:
            builder = SHARD_FORMATS[Path(files[0]).suffix]
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True)
        ds = ds.decode(False)  # images stay encoded bytes: decoded only for the rows that are built
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

    def _read_blocks(self, start: dict[str, Any]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(block start, the block's rows in their seeded order), from `start` on, endless."""
        epoch, block, base, hf = start["epoch"], start["block"], start["base"], start["hf"]
        while True:
            ds = self._epoch_dataset(epoch)
            if hf is not None:
                ds.load_state_dict(hf)
            rows_in_epoch = 0
            # Whole blocks through `iter`: the datasets state after one is where the next starts; and `iter`
            # does not split the shards again inside a DataLoader worker (each worker walks the whole plan).
            for columns in ds.iter(batch_size=self.buffer):
                rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
                order = list(range(len(rows)))
                rng = random.Random(f"{self.seed}:{self.split}:{self.name}:{self.rank}:block:{epoch}:{block}")
                rng.shuffle(order)
                yield {"epoch": epoch, "block": block, "base": base, "hf": hf}, [rows[i] for i in order]
                rows_in_epoch += len(rows)
                base, block, hf = base + len(rows), block + 1, ds.state_dict()
            if rows_in_epoch == 0 and block == 0:
                raise ValueError(f"{self.source}: process {self.rank} of {self.world_size} has no records")
            epoch, block, hf = epoch + 1, 0, None

    # --- reading ----------------------------------------------------------------------------------------
    def read(self) -> tuple[int, dict[str, Any]]:
        """The next row of this process's part and its index."""
        if self._block_pos >= len(self._block):
            if self._blocks is None:
                self._blocks = self._read_blocks(self._start)
                self._starts = []
            self._start, self._block = next(self._blocks)
            self._block_pos = 0
            self._starts.append(self._start)
            self.epoch = self._start["epoch"]
        row = self._block[self._block_pos]
        self._block_pos += 1
        self.next_index += 1
        return self.next_index - 1, row

    def release_before(self, index: int) -> None:
        """Rows below `index` will not be asked for again: forget the block starts only they needed."""
        while len(self._starts) > 1 and self._starts[1]["base"] <= index:
            self._starts.pop(0)

    def state(self, keep_from: int | None = None) -> dict[str, Any]:
        """JSON-ready position: replaying it reads again the rows from `keep_from` (default: none) on."""
        keep_from = self.next_index if keep_from is None else keep_from
        start = (
            next(s for s in reversed(self._starts) if s["base"] <= keep_from) if self._starts else self._start
        )
        return {"start": dict(start), "read": self.next_index - start["base"], "keep_from": keep_from}

    def restore(self, state: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """Go to `state`'s position; returns the rows from its ``keep_from`` on, read again."""
        self._start = dict(state["start"])
        self._starts = [self._start]
        self._blocks, self._block, self._block_pos = None, [], 0
        self.next_index = self._start["base"]
        self.epoch = self._start["epoch"]
        kept = []
        for _ in range(state["read"]):
            index, row = self.read()
            if index >= state["keep_from"]:
                kept.append((index, row))
        return kept

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets a copy: the open files stay here, the copy replays the position.
        out = dict(self.__dict__)
        out["_pending"] = self.state()
        out["_blocks"], out["_block"], out["_block_pos"] = None, [], 0
        return out

    def __setstate__(self, state: dict[str, Any]) -> None:
        pending = state.pop("_pending")
        self.__dict__.update(state)
        self.restore(pending)

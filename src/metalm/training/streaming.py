"""Training data from sharded sources (:mod:`metalm.data.shards`): each process reads only its own part,
as it goes, in bounded memory.

A stream whose ``source`` is a shard pattern, ``.tar``/``.parquet`` files or ``streaming: true`` becomes a
:class:`ShardSource`; a configuration with one makes the training data a :class:`ShardedDataStream`. The
samples are built by the same code as in-memory records (:mod:`metalm.training.data`); what changes is where
records come from and what the sequence is:

- **one sequence per process.** Process ``r`` of ``N`` plans and builds its own ``batch_size`` rows per
  micro-batch from its own shards (and, for an in-memory stream beside them, its records ``r, r+N, ...``);
  nothing is read for other processes. One epoch of a sharded stream over all processes is every record
  once; which process sees which record depends on ``N``, so 1 process is not the same sequence as 2 (the
  in-memory mode's guarantee), and a checkpoint resumes with the same number of processes only.
- **text as it streams.** A document is tokenised when it is read (its token count places the text
  window); packing and span drawing are the in-memory code's, over the records held.
- **bounded memory.** A stream holds the records of its last ``batch_size`` rows plus the text window in
  progress (their token ids too), and the reader holds one shuffle block.
- **exact resume.** A process's state is its plan counters, the rows whose records are still held and the
  reader's position (:meth:`ShardReader.state`); loading it reads those records again from their block.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from itertools import chain
from typing import Any

from metalm.data.records import Record, RecordError
from metalm.data.shards import ShardReader, row_to_record
from metalm.modalities import get_modality
from metalm.training.config import StreamConfig
from metalm.training.data import DataStream, StreamRecords
from metalm.training.plan import Row, StreamWalk
from metalm.training.stream import Stream

__all__ = [
    "STATE_VERSION",
    "ShardSource",
    "ShardWalk",
    "ShardedDataStream",
    "sharded_stream_records",
]

STATE_VERSION = "sharded-1"


@dataclass(frozen=True)
class ShardSource:
    """What a sharded stream reads (it stands where a record list does in :class:`StreamRecords`)."""

    source: str
    kind: str
    fields: dict[str, str]
    buffer: int


def sharded_stream_records(stream: StreamConfig, split: str) -> StreamRecords | None:
    """A sharded stream's :class:`StreamRecords` for `split`; None for validation without a
    ``validation_source``."""
    source = stream.source if split == "train" else stream.validation_source
    if source is None:
        return None
    spec = ShardSource(source, stream.shard_kind, dict(stream.fields or {}), stream.shuffle_buffer)
    return StreamRecords(stream.name or source, stream.weight, spec, stream)  # type: ignore[arg-type]


class ShardWalk(StreamWalk):
    """A :class:`StreamWalk` over a :class:`ShardReader`: records are read when the walk needs them and held
    (in ``held``) while a row of the last ``keep_rows`` or the window in progress uses them."""

    def __init__(self, name: str, reader: ShardReader, stream: _ShardStream, window: int) -> None:
        super().__init__(
            name,
            0,
            seed=reader.seed,
            split=reader.split,
            window=window,
            packs=stream.packs,
            length=lambda idx: len(stream._text_ids(idx)),
        )
        self.reader = reader
        self.stream = stream
        self.held: dict[int, Record] = {}
        self.recent: deque[tuple[int, ...]] = deque()  # the records of the latest rows, oldest first
        self.keep_rows = 1  # set by ShardedDataStream: a micro-batch is planned whole, then built
        self._pending: dict[str, Any] | None = None

    def _next_record(self) -> int:
        while True:
            idx, row = self.reader.read()
            try:
                self.held[idx] = row_to_record(
                    row, self.stream.spec.kind, self.stream.spec.fields, self.reader.base_dir
                )
                return idx
            except RecordError as err:
                self.stream.bad_row(idx, row, err)

    def _in_progress(self) -> set[int]:
        return {p[0] for p in self.pieces} | ({self.doc} if self.doc is not None else set())

    def next_row(self, stream: int) -> Row:
        self._apply_pending()
        row = super().next_row(stream)
        self.recent.append((row.record,) if row.record is not None else tuple(p[0] for p in row.pieces))
        if len(self.recent) > self.keep_rows:
            old = self.recent.popleft()
            live = set(chain.from_iterable(self.recent)) | self._in_progress()
            for idx in set(old) - live:
                self.held.pop(idx, None)
                self.stream.ids.pop(idx, None)
            self.reader.release_before(min(live, default=self.reader.next_index))
        return row

    def order(self, epoch: int) -> list[int]:
        raise NotImplementedError("a sharded stream has no epoch order known in advance")

    # --- resume -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        live = set(chain.from_iterable(self.recent)) | self._in_progress()
        return {
            "sharded": True,
            "epoch": self.reader.epoch,
            "samples": self.samples,
            "doc": self.doc,
            "offset": self.offset,
            "pieces": [list(p) for p in self.pieces],
            "recent": [list(r) for r in self.recent],
            "reader": self.reader.state(min(live, default=None)),
        }

    def load(self, state: dict[str, Any]) -> None:
        if not state.get("sharded"):
            raise ValueError(f"stream {self.name!r}: the checkpoint read it from memory, it is sharded now")
        self._pending = state  # applied when the walk next reads (a loader's parent only keeps it)

    def _apply_pending(self) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        self.samples, self.doc, self.offset = state["samples"], state["doc"], state["offset"]
        self.pieces = [list(p) for p in state["pieces"]]
        self.recent = deque(tuple(r) for r in state["recent"])
        live = set(chain.from_iterable(self.recent)) | self._in_progress()
        self.held.clear()  # in place: the stream's `records` is this dict
        self.stream.ids.clear()
        for idx, row in self.reader.restore(state["reader"]):
            if idx in live:
                self.held[idx] = row_to_record(
                    row, self.stream.spec.kind, self.stream.spec.fields, self.reader.base_dir
                )


class _ShardStream(Stream):
    """A stream whose records come from a :class:`ShardWalk` (``records`` is the walk's ``held``)."""

    def __init__(self, spec: StreamRecords, ctx, rank: int, world_size: int) -> None:
        self.spec: ShardSource = spec.records  # type: ignore[assignment]
        self.rank, self.world_size = rank, world_size
        super().__init__(spec, ctx)
        # A streamed input comes round once an epoch: not worth holding (each kind's cache of nothing).
        self.caches = {kind: self._no_cache(kind, cache) for kind, cache in ctx.caches.items()}

    def _make_walk(self) -> StreamWalk:
        reader = ShardReader(
            self.spec.source,
            name=self.name,
            seed=self.ctx.seed,
            split=self.ctx.split,
            rank=self.rank,
            world_size=self.world_size,
            buffer=self.spec.buffer,
        )
        walk = ShardWalk(self.name, reader, self, self.ctx.seq_len - len(self.bos))
        self.records = walk.held  # type: ignore[assignment]
        return walk

    def _rng(self, counter: int) -> random.Random:
        return random.Random(f"{self.ctx.seed}:{self.ctx.split}:{self.name}:{self.rank}:sample:{counter}")

    def bad_row(self, idx: int, row: dict[str, Any], err: RecordError) -> None:
        """A row that is no record of this stream's kind: raised, or (``skip_bad``) reported and skipped."""
        where = row.get("__url__") or self.spec.source
        key = row.get("__key__") or row.get("key") or row.get("id")
        error = RecordError(
            f"{err.reason if hasattr(err, 'reason') else err} (stream {self.name!r}, row {key or idx})",
            path=str(where),
            field=err.field,
        )
        if not self.ctx.skip_bad:
            raise error
        self.bad.add(idx)
        self.ctx.tally.bad.append((self.name, idx, error))

    @staticmethod
    def _no_cache(kind: str, cache: Any) -> Any:
        empty = get_modality(kind).new_cache(0)
        return cache if empty is None else empty

    def _input_name(self, idx: int, ref: Any) -> str:
        rec = self.records[idx]
        return f"{self.spec.source} record {rec.id or idx}" if isinstance(ref, bytes) else ref

    def _single_records(self) -> list[int]:
        # A bad record's row takes another held record (the same ones after a resume: see ShardWalk.state).
        return sorted(i for i in self.records if not self.packs(i))

    def encoders(self, row: Row) -> set[str]:
        ctx = self.ctx
        if row.pieces:
            return {ctx.text_encoder} if ctx.text_encoder else set()
        images = self.spec.kind in ("image_text", "vqa")
        encoded_text = self.instruction or images
        return {
            e for e, used in ((ctx.image_encoder, images), (ctx.text_encoder, encoded_text)) if e and used
        }


class ShardedDataStream(DataStream):
    """A :class:`DataStream` for one process of ``world_size`` whose sequence is its own (see the module
    docstring). Its :meth:`state_dict` holds every process's state (``peers``: the others'
    :meth:`local_tally`)."""

    def __init__(
        self, streams: list[StreamRecords], processor, *, rank: int = 0, world_size: int = 1, **kw
    ) -> None:
        self.node_rank, self.node_world = rank, world_size
        own = [
            s
            if isinstance(s.records, ShardSource)
            else StreamRecords(
                s.name,
                s.weight,
                s.records[rank::world_size],
                s.config,
                s.options,
                s.origins[rank::world_size] if s.origins else None,
            )
            for s in streams
        ]
        super().__init__(own, processor, rank=0, world_size=1, **kw)
        for s, rows in zip(self.streams, self.stream_rows):
            if isinstance(s.walk, ShardWalk):
                s.walk.keep_rows = rows

    def _make_stream(self, spec: StreamRecords) -> Stream:
        if isinstance(spec.records, ShardSource):
            return _ShardStream(spec, self.ctx, self.node_rank, self.node_world)
        return super()._make_stream(spec)

    def local_tally(self) -> dict[str, Any]:
        return {"rank": self.node_rank, "state": super().state_dict()}

    def state_dict(self, peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Every process's state, and the sums the trainer logs (``stats``, ``per_stream``, ``skip_report``)."""
        ranks = {str(p["rank"]): p["state"] for p in peers or []}
        ranks[str(self.node_rank)] = super().state_dict()
        stats: dict[str, int] = {}
        per_stream: dict[str, int] = {}
        items: list[list[Any]] = []
        count = 0
        for state in ranks.values():
            for key, n in state["stats"].items():
                stats[key] = stats.get(key, 0) + n
            for key, n in state["per_stream"].items():
                per_stream[key] = per_stream.get(key, 0) + n
            count += state["skip_report"]["count"]
            items += [i for i in state["skip_report"]["items"] if i not in items]
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "mix": self.mix,
            "split": self.split,
            "batch_size": self.batch_size,
            "world_size": self.node_world,
            "stats": stats,
            "per_stream": per_stream,
            "skip_report": {"count": count, "items": items},
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """This process's part of `state`: the number of processes and ``batch_size`` must be the saved ones
        (each process's sequence depends on both)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                "the checkpoint's data state is not a sharded one (it was taken without sharded streams)"
            )
        if (state["world_size"], state["batch_size"]) != (self.node_world, self.batch_size):
            raise ValueError(
                f"data state was saved by {state['world_size']} process(es) x batch_size {state['batch_size']}; "
                f"this run has {self.node_world} x {self.batch_size}. With sharded streams each process reads "
                "its own shards: resume with the same number of processes and batch_size"
            )
        super().load_state_dict(state["ranks"][str(self.node_rank)], strict=True)

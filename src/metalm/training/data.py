"""Training data: configured streams of records → semi-causal samples → padded batches.

This module mixes the streams into batches and keeps their state; records are read by
:mod:`metalm.training.stream_records`, each stream's rows become samples in :mod:`metalm.training.stream`
(what each record kind becomes, truncation, replacement of unusable rows) through
:mod:`metalm.training.samples` (records → processor parts → ``MetaLMProcessor.build_sample``, the builder
serving and evaluation use), and the state is resumed by :mod:`metalm.training.data_state`.

Streams are mixed by ``weight`` with a seeded RNG, per sample or per batch (``data.mix``). Each stream reads
its records in a seeded permutation per epoch, every record once per epoch.

**One global sequence for any number of processes.** The samples form a single sequence that does not
depend on the number of processes: micro-batch ``g`` of the run is samples ``[g*G, (g+1)*G)`` with
``G = batch_size * world_size`` (the *global* micro-batch), and rank ``r`` trains on rows
``[r*batch_size, (r+1)*batch_size)`` of it. Which stream, record or window, and RNG counter each row gets
is a plan (:mod:`metalm.training.plan`) that every process walks in full: mixing draws, epoch orders and
the packing of documents by their token counts, integers only. Each process builds only its own rows
(tokenising their text, drawing spans, decoding images). So 2 processes × batch ``B`` see exactly the
batches of 1 process × batch ``2B``, and the data state is global: a checkpoint taken with one number of
processes resumes with another. (The one thing every process still computes for every text document is
its token count, once: where a window starts depends on the documents before it.) DataLoader workers
(:mod:`metalm.training.loader`) split a rank's batches the same way.

All randomness comes from RNGs seeded with (seed, split, stream, counter), so
:meth:`DataStream.state_dict` is a few counters plus the pieces of the text window being filled, and
:meth:`DataStream.load_state_dict` resumes exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from metalm.data.records import SkipReport
from metalm.data.segments import EncodedSegment, Sample
from metalm.training.config import DataConfig
from metalm.training.data_state import STATE_VERSION, DataStreamState
from metalm.training.plan import Plan, Row
from metalm.training.samples import (
    BuildContext,
    Tally,
    payload_caches,
    truncate_sample,
)
from metalm.training.stream import Stream
from metalm.training.stream_records import StreamRecords, load_stream_records

__all__ = [
    "STATE_VERSION",
    "DataStream",
    "StreamRecords",
    "Tally",
    "build_data",
    "load_stream_records",
    "truncate_sample",
]

logger = logging.getLogger(__name__)


class DataStream(DataStreamState):
    """An endless, resumable stream of batches mixed from several record streams, for one rank.

    ``next_batch()`` returns this rank's ``batch_size`` rows of the next global micro-batch
    (``batch_size * world_size`` samples, see the module docstring) as
    ``processor.collate(samples, padding_side="right")``; ``last_sources`` then holds (stream name, record
    indices) per sample, which is per row unless ``pack`` (then ``collate(..., pack=...)`` puts several
    samples in one row of at most ``seq_len``, or the longest row a stream of the micro-batch makes;
    validation streams are never packed). Only this rank's rows are built; the rest of the sequence is walked in the plan
    (:mod:`metalm.training.plan`). With ``fill_encoders`` (FSDP: every rank must run the same sharded
    modules), an encoder that the global micro-batch may use but this rank's rows do not gets one extra
    *filler* row at the end: a tiny payload for each such encoder and no labels, so it adds nothing to the
    loss or the gradients. "May use" is decided from the plan alone (the same on every rank); ``last_sources``
    never lists the filler."""

    def __init__(
        self,
        streams: list[StreamRecords],
        processor,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mix: str = "sample",
        skip_bad: bool = False,
        split: str = "train",
        caches: dict[str, Any] | None = None,
        report: SkipReport | None = None,
        fill_encoders: bool = False,
        pack: bool = False,
        transcripts: dict[str, float] | None = None,
        batch_sizes: dict[str, int] | None = None,
        steps: list[tuple[int, int | None] | None] | None = None,
        grad_accum: int = 1,
    ) -> None:
        if not streams:
            raise ValueError("no data streams")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if mix not in ("sample", "batch"):
            raise ValueError(f"mix must be 'sample' or 'batch', got {mix!r}")
        self.processor = processor
        self.config = processor.config
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.mix = mix
        self.split = split
        self.fill_encoders = fill_encoders
        self.pack = pack
        self.transcripts = transcripts or {}  # transcript-loss weights per encoder (collate)
        self.report = report if report is not None else SkipReport()
        if caches is None:  # each kind's payload cache (decoded images, log-mel features), 1 GiB each
            caches = payload_caches(processor, 1 << 30)
        self.ctx = BuildContext(processor, seq_len, skip_bad, split, caches, seed)
        self.streams = [self._make_stream(s) for s in streams]
        self.names = [s.name for s in self.streams]
        if pack and any(s.config.typed_twin for s in self.streams):
            raise ValueError(
                "data.pack: a stream's typed_twin takes the answer position per row; leave pack off"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stream names must be unique, got {self.names}")
        self.batch_sizes = dict(batch_sizes or {})  # streams with rows per micro-batch of their own
        if set(self.batch_sizes) - set(self.names):
            raise ValueError(f"batch_sizes name streams this data does not have: {sorted(self.batch_sizes)}")
        if self.batch_sizes and mix != "batch":
            raise ValueError("streams with a batch_size of their own need mix='batch'")
        # Rows per process of a micro-batch drawn from each stream.
        self.stream_rows = [self.batch_sizes.get(name, batch_size) for name in self.names]
        self.plan = Plan(
            [s.walk for s in self.streams],
            [s.weight for s in self.streams],
            seed=seed,
            split=split,
            mix=mix,
            steps=steps,  # the optimizer steps each stream is drawn in (None: all)
            grad_accum=grad_accum,
        )
        # Counts of building (truncated, skipped...): loaded from a checkpoint (global) + built here.
        self.base_counts: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.said: set[str] = set()  # one-off warnings already logged
        self.reported: set[tuple[str, int]] = set()  # bad records already in the report
        self.last_sources: list[tuple[str, list[int]]] = []

    def _make_stream(self, spec: StreamRecords) -> Stream:
        return Stream(spec, self.ctx)

    @property
    def stats(self) -> dict[str, int]:
        """Samples and batches of the global sequence; samples truncated or skipped (as built here, plus
        what a loaded checkpoint counted)."""
        out = {
            "samples": self.plan.samples,
            "truncated": 0,
            "skipped_no_target": 0,
            "batches": self.plan.batches,
        }
        for counts in (self.base_counts, self.counts):
            for key, n in counts.items():
                out[key] = out.get(key, 0) + n
        return out

    @property
    def per_stream(self) -> dict[str, int]:
        return dict(self.plan.per_stream)

    def shard_order(self, stream: str, epoch: int) -> list[int]:
        """The records of `stream`'s `epoch` that land on this rank's rows, in order, when `stream` is read
        alone and each record makes one sample (VQA, captions; text is packed into windows instead):
        position ``p`` of the epoch order goes to rank ``(p // rows) % world_size``, ``rows`` the stream's rows
        per process (its own ``batch_size``, else the run's)."""
        k = self.names.index(stream)
        order, rows = self.streams[k].walk.order(epoch), self.stream_rows[k]
        return [i for p, i in enumerate(order) if (p // rows) % self.world_size == self.rank]

    def choose(self, draw: int, batch: int = 0) -> int:
        """The stream index of mixing draw number `draw` in micro-batch `batch` (:meth:`Plan.choose`)."""
        return self.plan.choose(draw, batch)

    def next_sample(self) -> tuple[Sample, str, list[int]]:
        """The next sample of the global sequence (mix per sample), with its stream name and record
        indices."""
        row = self.plan.next_row()
        sample, sources = self.streams[row.stream].build(row)
        self.absorb(self.ctx.tally.drain())
        return sample, self.names[row.stream], sources

    def next_batch(self) -> dict:
        """This rank's rows of the next global micro-batch, collated."""
        batch = self.build_batch(self.plan_batch())
        self.absorb(self.ctx.tally.drain())
        return batch

    def plan_batch(self) -> list[Row]:
        """The rows of the next global micro-batch: ``world_size`` times its stream's rows per process."""
        return self.plan.next_batch([n * self.world_size for n in self.stream_rows])

    def build_batch(self, rows: list[Row]) -> dict:
        """Build and collate this rank's share of the global micro-batch `rows` (sets `last_sources`)."""
        size = len(rows) // self.world_size  # this rank's rows (a stream may have a batch_size of its own)
        samples, self.last_sources = [], []
        own: set[str] = set()  # encoders of this rank's rows
        twins: list[tuple[int, Sample, float]] = []  # (row, typed twin, weight): the typed_twin loss
        for row in rows[self.rank * size : (self.rank + 1) * size]:
            stream = self.streams[row.stream]
            sample, sources = stream.build(row)
            own |= {seg.encoder for seg in sample if isinstance(seg, EncodedSegment)}
            twin = stream.typed_twin(row, sources)
            if twin is not None:
                twins.append((len(samples), twin, stream.config.typed_twin))
            samples.append(sample)
            self.last_sources.append((self.names[row.stream], sources))
        if self.fill_encoders:
            used = set().union(*(self.streams[row.stream].encoders(row) for row in rows))
            if used - own:
                samples.append(
                    self._filler([e["name"] for e in self.config.encoders if e["name"] in used - own])
                )
        # A packed row holds whole samples: as long as the longest row a stream of this micro-batch makes (an
        # in-context stream's rows have their own `in_context.seq_len`).
        pack = max(self.seq_len, *(self.streams[row.stream].seq_len for row in rows)) if self.pack else None
        batch = self.processor.collate(samples, padding_side="right", pack=pack, transcripts=self.transcripts)
        if twins:
            batch["typed_twins"] = {
                "batch": self.processor.collate([t for _, t, _ in twins], padding_side="right"),
                "rows": torch.tensor([r for r, _, _ in twins]),
                "weights": torch.tensor([w for _, _, w in twins], dtype=torch.float32),
            }
        return batch

    def _filler(self, encoders: list[str]) -> Sample:
        """A label-free row with a minimal payload for each of `encoders` (see the class docstring)."""
        p = self.processor
        return [
            p.plugin_of(name).filler(self.config.encoder_spec(name), p.preprocessors[name])
            for name in encoders
        ]

    def absorb(self, tally: Tally) -> None:
        """Count what building found (here or in a loader worker), report bad records once each and log
        one-off warnings once."""
        for key, n in tally.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        for name, idx, err in tally.bad:
            self.streams[self.names.index(name)].bad.add(idx)  # a worker's find: skipped here from now on
            if (name, idx) not in self.reported:
                self.reported.add((name, idx))
                self.report.add(err)
                logger.warning("skipping bad record: %s", err)
        for note in tally.notes:
            if note not in self.said:
                self.said.add(note)
                logger.warning("%s", note)

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def take(self, n: int) -> list[dict]:
        return [self.next_batch() for _ in range(n)]


def build_data(
    data: DataConfig,
    processor,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    report: SkipReport | None = None,
    eval_batch_size: int | None = None,
    fill_encoders: bool = False,
    transcripts: dict[str, float] | None = None,
    grad_accum: int = 1,
) -> tuple[DataStream, DataStream | None]:
    """The training stream and the validation stream (None when no stream has validation records).
    `batch_size` is per process, and so is a stream's own ``batch_size`` (training batches only: validation
    batches are `eval_batch_size` rows of every stream); see :class:`DataStream` for `fill_encoders`.
    `transcripts`: the training stream's transcript-loss weights per encoder (validation measures the LM
    loss alone). `grad_accum`: micro-batches per optimizer step, where streams have ``steps`` (validation
    batches draw every stream)."""
    report = report if report is not None else SkipReport()
    val_report = SkipReport()
    caches = payload_caches(processor, data.image_cache_mb * (1 << 20))  # shared by both splits
    train = [load_stream_records(s, data, "train", report) for s in data.streams]
    val = [v for v in (load_stream_records(s, data, "validation", val_report) for s in data.streams) if v]
    common = dict(
        seq_len=data.seq_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
        mix=data.mix,
        skip_bad=data.skip_bad,
        caches=caches,
        fill_encoders=fill_encoders,
    )
    data_stream: type[DataStream] = DataStream
    if any(s.sharded for s in data.streams):  # each process reads its own part (training/streaming.py)
        from metalm.training.streaming import ShardedDataStream

        data_stream = ShardedDataStream
    train_stream = data_stream(
        train,
        processor,
        batch_size=batch_size,
        split="train",
        report=report,
        pack=data.pack,
        transcripts=transcripts,
        batch_sizes=data.stream_batch_sizes(),
        steps=data.stream_steps(),
        grad_accum=grad_accum,
        **common,
    )
    val_stream = (
        data_stream(
            val,
            processor,
            batch_size=eval_batch_size or batch_size,
            split="validation",
            report=val_report,
            **common,
        )
        if val
        else None
    )
    return train_stream, val_stream

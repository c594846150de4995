"""One training stream: its records, and the sample each row of the plan becomes.

:class:`Stream` holds a stream's records and the builders of :class:`~metalm.training.samples.RecordSamples`;
:mod:`metalm.training.data` mixes the streams into batches, and the plan (:mod:`metalm.training.plan`) says
which record, window and RNG counter each row gets.

Each stream's records (``metalm.data.records``) are held in memory (text and image *references*), except a
sharded stream's, which each process reads from its own shards as it goes (:mod:`metalm.training.streaming`:
its own sequence per process, built by the code here); token ids are computed once per record and cached,
decoded images are cached as uint8 arrays and clips as log-mel features (each kind's plugin cache holds up
to ``data.image_cache_mb``). What a record becomes:

- ``text`` (and ``classification``, as the document ``"<text>\\ntopic: <label>"``): documents are packed
  into ``seq_len`` windows (full-sentence packing, an EOS after each document; the same cut as
  :func:`metalm.data.semicausal.pack_documents`), then random non-causal spans are drawn with the model's
  ``semi_causal`` settings (:func:`~metalm.data.semicausal.sample_spans`). Without a text encoder (the GPT
  baseline) a window is plain causal text.
- ``image_text``: :func:`~metalm.data.semicausal.image_text_sample`: image, encoded text prefix of random
  length, causal rest.
- ``vqa``: ``[BOS] [image] Enc("question: Q") answer: A [EOS]`` with only ``A [EOS]`` trained (without a
  text encoder the question is plain decoder text).
- ``interleaved``: text, images and speech in order, all text trained.
- ``audio_text``: as ``image_text``, the clip standing where the image does: speech, encoded transcript
  prefix of random length, causal rest.
- a spoken ``vqa`` or ``classification`` record (one with ``audio``): ``[BOS] [image] [speech] answer: A
  [EOS]`` with only ``A [EOS]`` trained; the clip is the question (or text), so no template is rendered.
  Clips are decoded on every process (their length sets their slot count) and their log-mel features
  cached (the audio plugin's :class:`~metalm.modalities.audio.LogMelCache`).

A sample longer than ``seq_len`` is **truncated** (a text segment is cut; an encoded segment that does not
fit is dropped with everything after it). Both are counted in :attr:`DataStream.stats`. A row whose sample
is unusable, a bad record (under ``skip_bad``) or nothing left to train on, is **replaced** by something
that depends on that row alone, so no other row moves: a window is trained as plain causal text, a record
is swapped for a record of the same stream drawn with the row's own RNG.
"""

from __future__ import annotations

import random

from metalm.data.records import Classification, TextDocument
from metalm.data.segments import Sample, TextSegment, sample_length
from metalm.training.config import StreamConfig
from metalm.training.episodes import balanced_weights
from metalm.training.plan import Row, StreamWalk
from metalm.training.samples import BuildContext, RecordSamples, has_target, truncate_sample
from metalm.training.stream_records import StreamRecords

__all__ = ["MAX_TRIES", "Stream"]

# A row whose sample is unusable is replaced by another record of its stream; at most this many tries.
MAX_TRIES = 1000


class Stream(RecordSamples):
    """One stream's records and what turns them into samples (token caches, the records found bad here, the
    sample builders: :class:`~metalm.training.samples.RecordSamples`). Where the stream is in the global
    sequence is a StreamWalk (plan.py)."""

    def __init__(self, spec: StreamRecords, ctx: BuildContext) -> None:
        self.name = spec.name
        self.weight = spec.weight
        self.records = spec.records
        self.origins = spec.origins
        self.ctx = ctx
        self.config = spec.config or StreamConfig(source=spec.name)  # format and instruction templates
        # Decoder positions a row of this stream may take: an in-context row may have its own.
        in_context = self.config.in_context
        self.seq_len = (in_context.seq_len if in_context else None) or ctx.seq_len
        self.options = spec.options
        self._init_samples()
        self.record_weights = self._balance_weights()  # None: records read as they are
        self.walk = self._make_walk()
        self._singles: list[int] | None = None
        self._record_encoders: set[str] | None = None

    def _make_walk(self) -> StreamWalk:
        """Where the stream is in the sequence (a sharded stream reads as it walks: training/streaming.py)."""
        return StreamWalk(
            self.name,
            len(self.records),
            seed=self.ctx.seed,
            split=self.ctx.split,
            window=self.ctx.seq_len - len(self.bos),
            packs=self.packs,
            length=lambda idx: len(self._text_ids(idx)),
            weights=self.record_weights,
        )

    def _balance_weights(self) -> list[float] | None:
        """The records' sampling weights under ``balance`` (training only: validation reads them as they are)."""
        if self.config.balance is None or self.ctx.split != "train":
            return None
        try:
            return balanced_weights(self.records)
        except TypeError as err:
            raise ValueError(f"stream {self.name!r}, balance: {self.config.balance}: {err}") from None

    def packs(self, idx: int) -> bool:
        """Does record `idx` go into text windows? (Instruction streams make one sample per record; only LM
        text is packed.)"""
        rec = self.records[idx]
        spoken = getattr(rec, "audio", None) is not None  # a spoken classification is no document
        return not self.instruction and not spoken and isinstance(rec, TextDocument | Classification)

    def _rng(self, counter: int) -> random.Random:
        # The ":0:" is where a rank used to be (one sequence per rank); kept so a seed gives the data it
        # gave before.
        return random.Random(f"{self.ctx.seed}:{self.ctx.split}:{self.name}:0:sample:{counter}")

    # --- rows → samples -----------------------------------------------------------------------------
    def typed_twin(self, row: Row, sources: list[int]) -> Sample | None:
        """The typed twin of a training row built from one spoken record, when the stream sets `typed_twin`
        (drawn with the row's own RNG); None otherwise."""
        if not self.config.typed_twin or self.ctx.split != "train" or len(sources) != 1:
            return None
        return self.twin_sample(sources[0], self._rng(row.counter))

    def build(self, row: Row) -> tuple[Sample, list[int]]:
        """The sample of `row` and the records it came from, cut to ``seq_len``. A row whose sample is
        unusable (a bad record, nothing left to train on) gets a replacement that depends on the row
        alone, so no other row moves: a window is trained as plain causal text, a record is swapped for
        one drawn with the row's own RNG."""
        if row.pieces:
            buf, ranges, docs = self._window(row.pieces)
            sample = self._fit(self._window_sample(buf, ranges, self._rng(row.counter)))
            if sample is None:
                sample = [TextSegment(list(self.bos), loss=False)] if self.bos else []
                sample = self._fit([*sample, TextSegment(list(buf))])
            return sample, sorted(set(docs))
        idx, rng = row.record, self._rng(row.counter)
        for tries in range(MAX_TRIES):
            if tries:
                spare = random.Random(
                    f"{self.ctx.seed}:{self.ctx.split}:{self.name}:spare:{row.counter}:{tries}"
                )
                idx, rng = spare.choice(self._single_records()), spare
            if idx in self.bad:
                continue
            used = [idx]
            if self.config.format == "in_context":
                sample, used = self._episode_sample(idx, rng)
            else:
                sample = self._record_sample(idx, rng)
            sample = self._fit(sample) if sample is not None else None
            if sample is not None:
                return sample, used
            if len(self.bad) == len(self._single_records()):
                raise ValueError(f"stream {self.name!r}: every record is bad; nothing to train on")
        raise ValueError(
            f"stream {self.name!r}: {MAX_TRIES:,} samples in a row had nothing to train on "
            f"(is seq_len {self.seq_len} too short for them?)"
        )

    def next_sample(self) -> tuple[Sample, list[int]]:
        """The next sample of this stream read on its own (its walk advances, no mixing draw)."""
        return self.build(self.walk.next_row(0))

    def _single_records(self) -> list[int]:
        if self._singles is None:
            self._singles = [i for i in range(len(self.records)) if not self.packs(i)]
        return self._singles

    def _window(self, pieces: tuple[tuple[int, int, int], ...]) -> tuple[list[int], list, list[int]]:
        """The token ids of a packed window, each document's range in it, and the documents."""
        buf: list[int] = []
        ranges, docs = [], []
        for doc, start, end in pieces:
            ranges.append((len(buf), len(buf) + end - start))
            docs.append(doc)
            buf += self._text_ids(doc)[start:end]
        return buf, ranges, docs

    def _fit(self, sample: Sample) -> Sample | None:
        """`sample` cut to ``seq_len`` (counted), or None when nothing in it is left to train on."""
        ctx = self.ctx
        if sample_length(sample, ctx.config) > self.seq_len:
            sample = truncate_sample(sample, self.seq_len, ctx.config)
            ctx.tally.count("truncated")
        if has_target(sample, ctx.config):
            return sample
        ctx.tally.count("skipped_no_target")
        return None

    def encoders(self, row: Row) -> set[str]:
        """The encoders `row`'s sample may use, known without building it (its replacement included):
        the text encoder for a window; for a record, what any one-record sample of this stream may use."""
        if row.pieces:
            return {self.ctx.text_encoder} if self.ctx.text_encoder else set()
        if self._record_encoders is None:
            self._record_encoders = self._encoders_used(
                {type(self.records[i]) for i in self._single_records()}
            )
        return self._record_encoders

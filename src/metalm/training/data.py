"""Training data: configured streams of records → semi-causal samples → padded batches.

Each stream's records (``metalm.data.records``) are held in memory (text and image *references*), except a
sharded stream's, which each process reads from its own shards as it goes (:mod:`metalm.training.streaming`:
its own sequence per process, built by the code here); token
ids are computed once per record and cached, and decoded images are cached as uint8 arrays (up to
``data.image_cache_mb``). What a record becomes:

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
  cached (:class:`metalm.modalities.audio.FeatureCache`).

A sample longer than ``seq_len`` is **truncated** (a text segment is cut; an encoded segment that does not
fit is dropped with everything after it). Both are counted in :attr:`DataStream.stats`. A row whose sample
is unusable, a bad record (under ``skip_bad``) or nothing left to train on, is **replaced** by something
that depends on that row alone, so no other row moves: a window is trained as plain causal text, a record
is swapped for a record of the same stream drawn with the row's own RNG.

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

import copy
import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metalm.data.audio import AudioError
from metalm.data.images import ImageError, ImagePreprocessor, load_image
from metalm.data.layouts import PromptLayout
from metalm.data.records import (
    AudioPart,
    AudioText,
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    Record,
    RecordError,
    SkipReport,
    TextDocument,
    TextPart,
    VQAExample,
    read_records,
)
from metalm.data.segments import EncodedSegment, Sample, TextSegment, sample_length
from metalm.data.semicausal import Word, image_text_sample, sample_spans, semicausal_sample
from metalm.modalities import get_modality
from metalm.modalities.audio import FeatureCache
from metalm.training.config import (
    DEFAULT_PROMPTS,
    OPTIONS_JOINER,
    DataConfig,
    StreamConfig,
    check_template,
)
from metalm.training.episodes import EpisodeSampler, answer_of
from metalm.training.plan import Plan, Row, StreamWalk

__all__ = [
    "DataStream",
    "ImageCache",
    "StreamRecords",
    "build_data",
    "load_stream_records",
    "truncate_sample",
]

logger = logging.getLogger(__name__)

# 3: a text window in progress is pieces of documents (2: its token ids; still read); 2: one global
# state for all processes (1 was per rank).
STATE_VERSION = 3
# Between an instruction sample's decoder text and its label: evaluation scores " " + option the same way.
TARGET_DELIMITER = " "


@dataclass
class StreamRecords:
    """One stream's records for one split. ``config``: the stream's settings (sample format, instruction
    templates; None = the defaults); ``options``: the labels a classification template writes in."""

    name: str
    weight: float
    records: list[Record]
    config: StreamConfig | None = None
    options: tuple[str, ...] | None = None
    # (file, line) per record, when read from files: errors found later name them.
    origins: list[tuple[str, int | None] | None] | None = None


# --------------------------------------------------------------------------------------------
# Loading records


def _subsample(records: list[Record], limit: int | None) -> list[Record]:
    # Evenly spaced, so a capped built-in keeps all its classes (they are stored class by class).
    if limit is None or len(records) <= limit:
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def load_stream_records(
    stream: StreamConfig, data: DataConfig, split: str, report: SkipReport | None = None
) -> StreamRecords | None:
    """Records of ``stream`` for ``split`` ("train" or "validation"); None when the stream has no
    validation records. Bad JSONL records raise :class:`RecordError`, or with ``data.skip_bad`` are
    counted into ``report``."""
    from metalm.data.builtin import BUILTIN_DATASETS, load_builtin

    name = stream.name or stream.source
    if stream.sharded:  # read as it streams, by each process (metalm.training.streaming)
        from metalm.training.streaming import sharded_stream_records

        return sharded_stream_records(stream, split)
    holdout = stream.validation_fraction is not None
    if split == "train" or holdout:  # a held-out fraction comes out of the training records
        source, builtin_split = stream.source, stream.split
    else:
        source, builtin_split = stream.validation_source, stream.validation_split
        if source is None:
            if stream.source not in BUILTIN_DATASETS or stream.validation_split is None:
                return None
            source = stream.source
        builtin_split = builtin_split or "validation"
    found: list[tuple[str, int | None]] = []  # (file, line) of each record read from files
    where: dict[int, tuple[str, int | None]] = {}  # by record object: they survive hold-out and subsampling
    if source in BUILTIN_DATASETS:
        records = load_builtin(source, builtin_split, kind=stream.kind)
    else:
        records = []
        report = report if report is not None else SkipReport()
        for rec in read_records(
            source, skip_bad=data.skip_bad, check_images=data.check_images, report=report, origins=found
        ):
            where[id(rec)] = found[-1]
            if stream.kind is not None and rec.kind != stream.kind:
                err = RecordError(
                    f"record of kind {rec.kind!r} in stream {name!r}, which takes kind {stream.kind!r}",
                    path=source,
                    field="kind",
                )
                if not data.skip_bad:
                    raise err
                report.add(err)
                continue
            records.append(rec)
    if holdout:
        from metalm.training.holdout import split_holdout

        try:
            parts = split_holdout(records, stream.validation_fraction, stream.validation_seed)
        except ValueError as err:
            raise ValueError(f"stream {name!r} ({source}): {err}") from None
        records = parts[0] if split == "train" else parts[1]
    records = _subsample(list(records), data.max_records)
    if not records:
        raise ValueError(f"stream {name!r} ({source}, {split}): no records")
    options = None
    if stream.supervised and any(isinstance(r, Classification) for r in records):
        if stream.options is not None:
            options = tuple(stream.options)
        elif split == "train":
            options = tuple(sorted({r.label for r in records if isinstance(r, Classification)}))
        else:  # validation prompts must list the same options as training ones
            options = load_stream_records(stream, data, "train").options
    origins = [where.get(id(r)) for r in records] if where else None
    return StreamRecords(name, stream.weight, records, stream, options, origins)


# --------------------------------------------------------------------------------------------
# Images


def _tokenize(processor, text: str) -> list[int]:
    # verbose=False: a long document is fine here (it is packed), so no "longer than max length" warning.
    return processor.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _target_ids(processor, answer: str) -> list[int]:
    """An answer as a trained label: after a space (evaluation scores " " + option the same way), then EOS."""
    eos = [processor.eos_token_id] if processor.eos_token_id is not None else []
    return _tokenize(processor, TARGET_DELIMITER + answer) + eos


def _tokenize_words(processor, text: str) -> tuple[list[int], list[Word]]:
    """Token ids of ``text`` and its words (first token, has letters or digits), so that a caption prefix is
    cut between words. A slow tokenizer has no word map: each token is then a word."""
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        ids = _tokenize(processor, text)
        return ids, [Word(i, True) for i in range(len(ids))]
    enc = tok(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
    word_ids = enc.word_ids()
    words: list[Word] = []
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        content = any(ch.isalnum() for ch in text[start:end])
        if i == 0 or word_ids[i] is None or word_ids[i] != word_ids[i - 1]:
            words.append(Word(i, content))
        elif content:  # a later piece with letters makes the word informative
            words[-1] = Word(words[-1].start, True)
    return list(enc["input_ids"]), words


class ImageCache:
    """Decoded, resized images as uint8 [3, H, W] arrays keyed by (reference, size, resample, crop);
    normalisation is applied on the way out, giving exactly ``ImagePreprocessor.prepare``'s values.
    Caching stops (without evicting) once ``max_bytes`` are held."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: dict[tuple, np.ndarray] = {}

    def get(self, ref: str, pre: ImagePreprocessor, name: str | None = None) -> torch.Tensor:
        key = (ref, pre.size, pre.resample, pre.center_crop)
        u8 = self._cache.get(key)
        if u8 is None:
            # prepare() with mean 0 / std 1 gives the resized pixels / 255: exact uint8 after rounding.
            raw = dataclasses.replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
            u8 = np.rint(raw.prepare(load_image(ref, name=name)) * 255.0).astype(np.uint8)
            if self.bytes + u8.nbytes <= self.max_bytes:
                self._cache[key] = u8
                self.bytes += u8.nbytes
        # Same operations, in the same float32 order, as ImagePreprocessor.prepare.
        arr = u8.astype(np.float32) / 255.0
        mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray((arr - mean) / std))


# --------------------------------------------------------------------------------------------
# Samples


def truncate_sample(sample: Sample, limit: int, config) -> Sample:
    """Cut a sample to at most ``limit`` decoder positions: a text segment is shortened, an encoded
    segment that does not fit whole is dropped together with everything after it."""
    out: Sample = []
    used = 0
    for seg in sample:
        n = sample_length([seg], config)
        if used + n <= limit:
            out.append(seg)
            used += n
            continue
        if isinstance(seg, TextSegment) and limit - used > 0:
            out.append(TextSegment(seg.ids[: limit - used], seg.loss))
        break
    return out


def _has_target(sample: Sample, config) -> bool:
    """True when some position after the first carries a label (the first is never predicted)."""
    pos = 0
    for seg in sample:
        n = sample_length([seg], config)
        if isinstance(seg, TextSegment):
            if seg.loss and pos + n > 1:
                return True
        elif seg.loss and seg.target_ids and pos >= 1:
            return True
        pos += n
    return False


@dataclass
class Tally:
    """What building samples found, since it was last drained: counts (``truncated``,
    ``skipped_no_target``, ``inputs_truncated``), bad records as ``(stream, record, (path, line, field,
    reason))`` and one-off warnings. Plain data, so a loader worker can send it to the training process."""

    counts: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, int, tuple]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def drain(self) -> Tally:
        """This tally's contents (it is left empty)."""
        out = Tally(self.counts, self.bad, self.notes)
        self.counts, self.bad, self.notes = {}, [], []
        return out


@dataclass
class _Context:
    """What building a sample reads: the processor, the model's encoders, the data settings. Shared by a
    DataStream's streams; what building finds goes to ``tally``."""

    processor: Any
    seq_len: int
    skip_bad: bool
    split: str
    image_cache: ImageCache
    seed: int
    tally: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self.config = self.processor.config
        texts = self.config.encoders_of_kind("text")
        visions = self.config.encoders_of_kind("vision")
        self.text_encoder: str | None = texts[0] if texts else None
        self.vision: str | None = visions[0] if visions else None
        self.image_pre = self.processor.image_processors[self.vision] if self.vision else None
        audios = self.config.encoders_of_kind("audio")
        self.audio: str | None = audios[0] if audios else None
        self.audio_cache = FeatureCache()
        self.semi_causal = dict(self.config.semi_causal)

    def to_encoder_ids(self, ids: list[int]) -> list[int]:
        return self.processor.to_encoder_ids(self.text_encoder, ids)


# A row whose sample is unusable is replaced by another record of its stream; at most this many tries.
MAX_TRIES = 1000


class _Stream:
    """One stream's records and what turns them into samples: token caches, the records found bad here,
    and the sample builders. Where the stream is in the global sequence is a StreamWalk (plan.py)."""

    def __init__(self, spec: StreamRecords, ctx: _Context) -> None:
        self.name = spec.name
        self.weight = spec.weight
        self.records = spec.records
        self.origins = spec.origins
        self.ctx = ctx
        self.config = spec.config or StreamConfig(source=spec.name)  # format and instruction templates
        self.instruction = self.config.supervised
        self._episodes: EpisodeSampler | None = None  # format: in_context (built on first use)
        # Decoder positions a row of this stream may take: an in-context row may have its own.
        in_context = self.config.in_context
        self.seq_len = (in_context.seq_len if in_context else None) or ctx.seq_len
        self.options = spec.options
        self.ids: dict[int, Any] = {}  # token cache, one entry per record
        self.bad: set[int] = set()  # records that failed (reported once, skipped afterwards)
        self.warned = False  # said that the images of this stream are left out
        # Every window opens with BOS, as every other sample does: a pretrained decoder reads text that
        # starts without it badly (frozen Gemma-3: loss 8.3 on a news sentence without BOS, 2.8 with it).
        bos = ctx.processor.bos_token_id
        self.bos = [bos] if bos is not None else []
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
        )

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

    # --- records → samples -------------------------------------------------------------------------
    def _bad(self, idx: int, err: Exception, field: str | None = None) -> None:
        rec = self.records[idx]
        rid = f" (id {rec.id})" if getattr(rec, "id", None) else ""
        origin = self.origins[idx] if self.origins else None
        if origin is not None:  # the file and line it came from, then where it sits in the stream
            reason = f"{err} (stream {self.name!r}, record {idx}{rid})"
            error = RecordError(reason, path=origin[0], line=origin[1], field=field)
        else:
            error = RecordError(str(err), path=f"stream {self.name!r}, record {idx}{rid}", field=field)
        if not self.ctx.skip_bad:
            raise error from err
        self.bad.add(idx)
        self.ctx.tally.bad.append((self.name, idx, error))  # reported and logged by the DataStream

    def _text_ids(self, idx: int) -> list[int]:
        ids = self.ids.get(idx)
        if ids is None:
            rec = self.records[idx]
            text = f"{rec.text}\ntopic: {rec.label}" if isinstance(rec, Classification) else rec.text
            ids = _tokenize(self.ctx.processor, text)
            eos = self.ctx.processor.eos_token_id
            ids = ids + ([eos] if eos is not None else [])
            self.ids[idx] = ids
        return ids

    def _image(self, idx: int, ref: str) -> torch.Tensor | None:
        o = self.ctx
        try:
            return o.image_cache.get(
                ref, o.image_pre, name=ref if not ref.startswith("data:") else "data URL"
            )
        except ImageError as err:
            self._bad(idx, err, field="image")
            return None

    def _speech(self, idx: int, ref: str) -> EncodedSegment | None:
        """The audio encoder's segment for clip `ref`, or None when the record is bad."""
        o = self.ctx
        try:
            if o.audio is None:
                raise ValueError("the model has no audio encoder to hear this clip")
            spec = o.config.encoder_spec(o.audio)
            features = o.audio_cache.get(ref, o.processor.preprocessors[o.audio], spec["max_seconds"])
        except (AudioError, ValueError) as err:
            self._bad(idx, err, field="audio")
            return None
        return EncodedSegment(o.audio, payload=features)

    def _spoken_sample(self, idx: int, bos: Sample) -> Sample | None:
        """``[BOS] [image] [speech] prompt label [EOS]``, only ``label [EOS]`` trained: a spoken VQA question
        (or classification text) is heard, not rendered into a template."""
        o = self.ctx
        rec = self.records[idx]
        speech = self._speech(idx, rec.audio)
        if speech is None:
            return None
        ids = self.ids.get(idx)
        if ids is None:
            target = rec.answers[0] if isinstance(rec, VQAExample) else rec.label
            prompt = self.config.decoder_prompt(rec.kind) or DEFAULT_PROMPTS["vqa"]
            ids = self.ids[idx] = (
                _tokenize(o.processor, prompt),
                _target_ids(o.processor, target),
            )
        sample: Sample = list(bos)
        if isinstance(rec, VQAExample) and o.vision is not None:
            pixels = self._image(idx, rec.image)
            if pixels is None:
                return None
            sample.append(EncodedSegment(o.vision, pixel_values=pixels))
        elif isinstance(rec, VQAExample):
            self._warn_images_left_out()
        return [*sample, speech, TextSegment(ids[0], loss=False), TextSegment(ids[1], loss=True)]

    def _record_sample(self, idx: int, rng: random.Random) -> Sample | None:
        o = self.ctx
        p = o.processor
        rec = self.records[idx]
        bos = [TextSegment([p.bos_token_id], loss=False)] if p.bos_token_id is not None else []
        eos = [p.eos_token_id] if p.eos_token_id is not None else []
        blind = o.vision is None  # no vision encoder (the GPT baseline): images are left out
        if isinstance(rec, VQAExample | Classification) and rec.audio is not None:
            return self._spoken_sample(idx, bos)
        if self.instruction or isinstance(rec, VQAExample):  # VQA is an instruction sample in any format
            return self._instruction_sample(idx, rng, bos, blind)
        if blind and isinstance(rec, ImageText | Interleaved):
            self._warn_images_left_out()
        if isinstance(rec, ImageText | AudioText):
            cached = self.ids.get(idx)
            if cached is None:
                cached = self.ids[idx] = _tokenize_words(p, rec.text)
            ids, words = cached
            if blind and isinstance(rec, ImageText):
                return [*bos, TextSegment(ids + eos)]
            # Speech stands where the image does: the same semi-causal recipe.
            medium = (
                self._image(idx, rec.image) if isinstance(rec, ImageText) else self._speech(idx, rec.audio)
            )
            if medium is None:
                return None
            return image_text_sample(
                medium,
                ids,
                o.vision,
                rng,
                text_encoder=o.text_encoder,
                to_encoder_ids=o.to_encoder_ids,
                words=words,
                bos_id=p.bos_token_id,
                eos_id=p.eos_token_id,
            )
        if isinstance(rec, Interleaved):
            sample = list(bos)
            texts = self.ids.get(idx)
            if texts is None:
                texts = self.ids[idx] = [
                    _tokenize(p, t.text) if isinstance(t, TextPart) else None for t in rec.parts
                ]
            for part, ids in zip(rec.parts, texts):
                if isinstance(part, ImagePart):
                    if blind:
                        continue
                    pixels = self._image(idx, part.image)
                    if pixels is None:
                        return None
                    sample.append(EncodedSegment(o.vision, pixel_values=pixels))
                elif isinstance(part, AudioPart):
                    speech = self._speech(idx, part.audio)
                    if speech is None:
                        return None
                    sample.append(speech)
                elif ids:
                    sample.append(TextSegment(ids))
            if eos:
                sample.append(TextSegment(eos))
            return sample
        raise TypeError(f"unexpected record {type(rec).__name__}")

    def _warn_images_left_out(self) -> None:
        """Once per stream, and from the training data only (validation reads the same streams)."""
        if self.ctx.split == "train" and not self.warned:
            self.warned = True
            self.ctx.tally.notes.append(
                f"the model has no vision encoder: images in stream {self.name!r} are left out "
                "(text-only baseline)"
            )

    # --- instruction samples (format: instruction; VQA always) ------------------------------------
    def _instruction_sample(self, idx: int, rng: random.Random, bos: Sample, blind: bool) -> Sample | None:
        """``[BOS] [image] Enc(template) prompt label [EOS]`` with only ``label [EOS]`` trained; without a
        text encoder (the GPT baseline) the rendered input is plain, untrained decoder text."""
        o = self.ctx
        rec = self.records[idx]
        if isinstance(rec, Classification):
            if self.options is not None and rec.label not in self.options:
                self._bad(
                    idx,
                    ValueError(f"label {rec.label!r} is not one of the options {list(self.options)}"),
                    "label",
                )
                return None
            fields = {"text": " ".join(rec.text.split()), "options": OPTIONS_JOINER.join(self.options or ())}
            kind, target, image = "classification", rec.label, None
        elif isinstance(rec, VQAExample):
            kind, fields, target, image = "vqa", {"question": rec.question}, rec.answers[0], rec.image
        elif isinstance(rec, ImageText):
            kind, fields, target, image = "image_text", {}, rec.text, rec.image
        else:
            self._bad(
                idx,
                ValueError(
                    f"a {rec.kind} record in a stream with format: instruction, which takes classification, "
                    "vqa and image_text records"
                ),
                "kind",
            )
            return None
        if image is not None and blind:
            self._warn_images_left_out()
        templates = self.config.templates(kind)
        k = rng.randrange(len(templates)) if len(templates) > 1 else 0
        cache = self.ids.setdefault(idx, {})
        entry = cache.get(k)
        if entry is None:
            with_image = image is not None and not blind
            entry = self._render_instruction(idx, kind, templates[k], fields, target, with_image, bos)
            if entry is None:
                return None
            cache[k] = entry
        sample: Sample = list(bos)
        if image is not None and not blind:
            pixels = self._image(idx, image)
            if pixels is None:
                return None
            sample.append(EncodedSegment(o.vision, pixel_values=pixels))
        if entry["input"]:
            if o.text_encoder:
                sample.append(
                    EncodedSegment(
                        o.text_encoder, input_ids=entry["input_enc"], target_ids=entry["input"], loss=False
                    )
                )
            else:
                sample.append(TextSegment(entry["input"], loss=False))
        if entry["prompt"]:
            sample.append(TextSegment(entry["prompt"], loss=False))
        sample.append(TextSegment(entry["target"], loss=True))
        if entry["cut"]:
            o.tally.count("inputs_truncated")
        return sample

    def _render_instruction(
        self,
        idx: int,
        kind: str,
        template: str,
        fields: dict[str, str],
        target: str,
        with_image: bool,
        bos: Sample,
    ) -> dict[str, Any] | None:
        """Token ids of one record under one template (cached by the caller). A classification text that
        does not fit is cut word by word (binary search) until the rendered input fits the text encoder's
        span limit and the whole sample fits ``seq_len``; any other input that exceeds the encoder's limit
        makes the record bad."""
        o = self.ctx
        p = o.processor
        field = "question" if kind == "vqa" else "text"
        reason = check_template(template, kind)  # a JSONL stream without `kind` meets kinds only here
        if reason:
            self._bad(idx, ValueError(reason), field)
            return None
        prompt_text = self.config.decoder_prompt(kind)
        prompt = _tokenize(p, prompt_text) if prompt_text.strip() else []
        target_ids = _target_ids(p, target)
        slots = o.config.num_slots(o.vision) if with_image else 0
        budget = o.seq_len - len(bos) - slots - len(prompt) - len(target_ids)
        limit = p.span_limit(o.text_encoder) if o.text_encoder else None

        def measure(text: str) -> tuple[list[int], list[int] | None, bool, bool]:
            """(decoder ids, encoder ids, within the encoder's limit, within seq_len)."""
            dec = _tokenize(p, text) if text.strip() else []
            if limit is None:
                return dec, None, True, len(dec) <= budget
            enc = o.to_encoder_ids(dec) if dec else []
            slots_used = o.config.num_slots(o.text_encoder, len(enc)) if enc else 0
            return dec, enc, len(enc) <= limit, slots_used <= budget

        layout = PromptLayout(template=template)
        text = layout.render(**fields)
        dec, enc, in_encoder, in_window = measure(text)
        cut = False
        if kind == "classification" and not (in_encoder and in_window):
            words = fields["text"].split()

            def render(n: int) -> str:
                return layout.render(**{**fields, "text": " ".join(words[:n])})

            # A word is at least one token, so no more than the token budget of words can fit.
            lo, hi = 0, max(0, min(len(words), budget if limit is None else min(budget, limit)))
            while lo < hi:  # the most words that fit
                mid = (lo + hi + 1) // 2
                if all(measure(render(mid))[2:]):
                    lo = mid
                else:
                    hi = mid - 1
            dec, enc, in_encoder, in_window = measure(render(lo))
            cut = True
            if not (in_encoder and in_window):
                self._bad(
                    idx,
                    ValueError(f"template {template!r} alone does not fit the text encoder or data.seq_len"),
                    field,
                )
                return None
        elif not in_encoder:
            self._bad(idx, ValueError(f"input longer than the text encoder takes ({limit} tokens)"), field)
            return None
        if dec and enc is not None and not enc:
            self._bad(idx, ValueError("input is empty in the text encoder's vocabulary"), field)
            return None
        return {"input": dec, "input_enc": enc, "prompt": prompt, "target": target_ids, "cut": cut}

    def _window_sample(self, ids: list[int], ranges: list[tuple[int, int]], rng: random.Random) -> Sample:
        o = self.ctx
        head = [TextSegment(list(self.bos), loss=False)] if self.bos else []
        if o.text_encoder is None:
            return [*head, TextSegment(list(ids))]
        sc = o.semi_causal
        span_max = min(sc["span_max"], o.processor.span_limit(o.text_encoder))
        span_min = min(sc["span_min"], span_max)
        spans = sample_spans(ranges, span_min, span_max, sc["span_fraction"], rng)
        sample = semicausal_sample(ids, spans, o.text_encoder, o.to_encoder_ids)
        limit = o.processor.span_limit(o.text_encoder)
        # A span whose re-tokenization for a different encoder vocabulary is empty or too long stays causal.
        return head + [
            TextSegment(list(seg.target_ids))
            if isinstance(seg, EncodedSegment) and not (0 < len(seg.input_ids) <= limit)
            else seg
            for seg in sample
        ]

    # --- rows → samples -----------------------------------------------------------------------------
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

    # --- in-context rows (format: in_context; see metalm.training.episodes) ---------------------------
    def _episode_sample(self, idx: int, rng: random.Random) -> tuple[Sample | None, list[int]]:
        """Demonstrations and the query ``idx`` in one window: each the stream's instruction sample, BOS only
        at the start, every answer trained (under relabelling, only answers whose word was shown before).
        A row that would not fit ``seq_len`` loses its earliest demonstrations. Also returns the records
        of the row in order (the query last)."""
        if self._episodes is None:
            self._episodes = EpisodeSampler(self.records, self.config.in_context, self._single_records())
        episode = self._episodes.draw(idx, rng)
        start = 1 if self.bos else 0  # every sample opens with one BOS segment when the decoder has BOS
        examples: list[tuple[int, Sample]] = []
        for j in (*episode.demonstrations, idx):
            sample = self._record_sample(j, rng)
            if sample is None and j == idx:
                return None, [idx]
            if sample is not None:
                examples.append((j, sample[start:]))
        used, keep = len(self.bos), 0
        for _, sample in reversed(examples):  # the query and the latest demonstrations that fit
            n = sample_length(sample, self.ctx.config)
            if keep and used + n > self.seq_len:
                break
            used, keep = used + n, keep + 1
        row: Sample = [TextSegment(list(self.bos), loss=False)] if self.bos else []
        shown: set[str] = set()
        kept = examples[len(examples) - keep :]
        for j, sample in kept:
            if episode.words is not None:
                label = answer_of(self.records[j])
                sample = self._relabelled(sample, episode.words[label], trained=label in shown)
                shown.add(label)
            row += sample
        return row, [j for j, _ in kept]

    def _relabelled(self, sample: Sample, word: str, *, trained: bool) -> Sample:
        """``sample`` with its answer (the last, trained segment) replaced by ``word``."""
        return [*sample[:-1], TextSegment(_target_ids(self.ctx.processor, word), loss=trained)]

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
        if _has_target(sample, ctx.config):
            return sample
        ctx.tally.count("skipped_no_target")
        return None

    def encoders(self, row: Row) -> set[str]:
        """The encoders `row`'s sample may use, known without building it (its replacement included):
        the text encoder for a window; for a record, what any one-record sample of this stream may use."""
        ctx = self.ctx
        if row.pieces:
            return {ctx.text_encoder} if ctx.text_encoder else set()
        if self._record_encoders is None:
            kinds = {type(self.records[i]) for i in self._single_records()}
            images = bool(kinds & {ImageText, VQAExample, Interleaved})
            encoded_text = self.instruction or bool(kinds & {ImageText, VQAExample})
            self._record_encoders = {
                e for e, used in ((ctx.vision, images), (ctx.text_encoder, encoded_text)) if e and used
            }
        return self._record_encoders


class DataStream:
    """An endless, resumable stream of batches mixed from several record streams, for one rank.

    ``next_batch()`` returns this rank's ``batch_size`` rows of the next global micro-batch
    (``batch_size * world_size`` samples, see the module docstring) as
    ``processor.collate(samples, padding_side="right")``; ``last_sources`` then holds (stream name, record
    indices) per sample, which is per row unless ``pack`` (then ``collate(..., pack=seq_len)`` puts
    several samples in one row; validation streams are never packed). Only this rank's rows are built; the rest of the sequence is walked in the plan
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
        image_cache: ImageCache | None = None,
        report: SkipReport | None = None,
        fill_encoders: bool = False,
        pack: bool = False,
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
        self.report = report if report is not None else SkipReport()
        self.ctx = _Context(processor, seq_len, skip_bad, split, image_cache or ImageCache(), seed)
        self.streams = [self._make_stream(s) for s in streams]
        self.names = [s.name for s in self.streams]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stream names must be unique, got {self.names}")
        self.plan = Plan(
            [s.walk for s in self.streams], [s.weight for s in self.streams], seed=seed, split=split, mix=mix
        )
        # Counts of building (truncated, skipped...): loaded from a checkpoint (global) + built here.
        self.base_counts: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.said: set[str] = set()  # one-off warnings already logged
        self.reported: set[tuple[str, int]] = set()  # bad records already in the report
        self.last_sources: list[tuple[str, list[int]]] = []

    def _make_stream(self, spec: StreamRecords) -> _Stream:
        return _Stream(spec, self.ctx)

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
        position ``p`` of the epoch order goes to rank ``(p // batch_size) % world_size``."""
        order = self.streams[self.names.index(stream)].walk.order(epoch)
        return [i for p, i in enumerate(order) if (p // self.batch_size) % self.world_size == self.rank]

    def choose(self, draw: int) -> int:
        """The stream index of mixing draw number `draw` (a pure function of seed and draw)."""
        return self.plan.choose(draw)

    def next_sample(self) -> tuple[Sample, str, list[int]]:
        """The next sample of the global sequence (mix per sample), with its stream name and record
        indices."""
        row = self.plan.next_row()
        sample, sources = self.streams[row.stream].build(row)
        self.absorb(self.ctx.tally.drain())
        return sample, self.names[row.stream], sources

    def next_batch(self) -> dict:
        """This rank's rows of the next global micro-batch, collated."""
        batch = self.build_batch(self.plan.next_batch(self.batch_size * self.world_size))
        self.absorb(self.ctx.tally.drain())
        return batch

    def build_batch(self, rows: list[Row]) -> dict:
        """Build and collate this rank's share of the global micro-batch `rows` (sets `last_sources`)."""
        first = self.rank * self.batch_size
        samples, self.last_sources = [], []
        own: set[str] = set()  # encoders of this rank's rows
        for row in rows[first : first + self.batch_size]:
            sample, sources = self.streams[row.stream].build(row)
            own |= {seg.encoder for seg in sample if isinstance(seg, EncodedSegment)}
            samples.append(sample)
            self.last_sources.append((self.names[row.stream], sources))
        if self.fill_encoders:
            used = set().union(*(self.streams[row.stream].encoders(row) for row in rows))
            if used - own:
                samples.append(
                    self._filler([e["name"] for e in self.config.encoders if e["name"] in used - own])
                )
        pack = self.seq_len if self.pack else None
        return self.processor.collate(samples, padding_side="right", pack=pack)

    def _filler(self, encoders: list[str]) -> Sample:
        """A label-free row with a minimal payload for each of `encoders` (see the class docstring)."""
        specs = [self.config.encoder_spec(name) for name in encoders]
        return [
            get_modality(spec["kind"]).filler(spec, self.processor.preprocessors[spec["name"]])
            for spec in specs
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

    # --- resume -------------------------------------------------------------------------------------
    def local_tally(self) -> dict[str, Any]:
        """What this process found while building (counts, bad records): for
        :meth:`state_dict`'s ``peers`` on the process that saves the state."""
        return {
            "counts": dict(self.counts),
            "bad": {s.name: sorted(s.bad) for s in self.streams},
            "report": [list(i) for i in self.report.items],
        }

    def state_dict(self, peers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """JSON-ready state of the global sequence; `load_state_dict` on a stream built from the same
        records resumes exactly, with any number of processes. The plan's position is the same on every
        rank; what building found differs per rank: `peers` are the other ranks' :meth:`local_tally`, to
        count and list their finds too."""
        stats = self.stats
        bad = {s.name: set(s.bad) for s in self.streams}
        report = SkipReport(self.report.count, list(self.report.items), self.report.max_items)
        for peer in peers or []:
            for key, n in peer["counts"].items():
                stats[key] = stats.get(key, 0) + n
            for name, idxs in peer["bad"].items():
                bad[name] |= set(idxs)
            for item in peer["report"]:
                if tuple(item) not in report.items:
                    report.add(RecordError(item[3], path=item[0], line=item[1], field=item[2]))
        plan = self.plan.state()
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "mix": self.mix,
            "draws": plan["draws"],
            "stats": stats,
            "per_stream": plan["per_stream"],
            "streams": {name: {**walk, "bad": sorted(bad[name])} for name, walk in plan["walks"].items()},
            "skip_report": {"count": report.count, "items": [list(i) for i in report.items]},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue the sequence where `state` left it. The state is global, so the number of processes
        may change; with ``strict`` the global micro-batch (``batch_size * world_size``) must stay the same
        (2 × 8 → 1 × 16 or 4 × 4), so the batch sequence continues exactly as it would have. With
        ``strict=False`` another global micro-batch is accepted: the *sample* sequence continues without
        duplicates or gaps, cut into batches of the new size."""
        state = copy.deepcopy(state)
        if state.get("version") == 2:
            state = self._upgrade_v2(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"unsupported data state version {state.get('version')!r} (this version reads {STATE_VERSION})"
            )
        for key in ("seed", "mix", "split"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data state was saved with {key}={state[key]!r}, this run has {getattr(self, key)!r}; "
                    "resume with the same settings"
                )
        saved = state["batch_size"] * state["world_size"]
        if strict and saved != self.batch_size * self.world_size:
            raise ValueError(
                f"data state was saved with a global micro-batch of {saved} samples (batch_size "
                f"{state['batch_size']} x world_size {state['world_size']}), this run has "
                f"{self.batch_size * self.world_size} (batch_size {self.batch_size} x world_size "
                f"{self.world_size}); keep batch_size x world_size the same to continue the same batches"
            )
        if sorted(state["streams"]) != sorted(self.names):
            raise ValueError(
                f"data state has streams {sorted(state['streams'])}, this run has {sorted(self.names)}"
            )
        stats = state["stats"]
        walks = {name: {k: v for k, v in s.items() if k != "bad"} for name, s in state["streams"].items()}
        self.plan.load(
            {
                "draws": state["draws"],
                "samples": stats["samples"],
                "batches": stats["batches"],
                "per_stream": state["per_stream"],
                "walks": walks,
            }
        )
        self.base_counts = {k: v for k, v in stats.items() if k not in ("samples", "batches")}
        self.counts = {}
        for s in self.streams:
            s.bad = set(state["streams"][s.name]["bad"])
        self.reported = {(s.name, i) for s in self.streams for i in s.bad}
        self.report.count = state["skip_report"]["count"]
        self.report.items = [tuple(i) for i in state["skip_report"]["items"]]

    def _upgrade_v2(self, state: dict[str, Any]) -> dict[str, Any]:
        """A version-2 state (a packer holding token ids) as version 3 (pieces of documents). A v2 packer
        that holds tokens always holds whole document ends: a document still in progress means the buffer
        was just emitted, empty."""
        for name, s in state["streams"].items():
            stream = self.streams[self.names.index(name)] if name in self.names else None
            packer = s.pop("packer")
            pieces = []
            for doc, (a, b) in zip(packer["docs"], packer["ranges"]):
                n = len(stream._text_ids(doc)) if stream is not None else b - a
                pieces.append([doc, n - (b - a), n])
            s["pieces"] = pieces
        state["version"] = STATE_VERSION
        return state


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
) -> tuple[DataStream, DataStream | None]:
    """The training stream and the validation stream (None when no stream has validation records).
    `batch_size` is per process; see :class:`DataStream` for `fill_encoders`."""
    report = report if report is not None else SkipReport()
    val_report = SkipReport()
    cache = ImageCache(data.image_cache_mb * (1 << 20))
    train = [load_stream_records(s, data, "train", report) for s in data.streams]
    val = [v for v in (load_stream_records(s, data, "validation", val_report) for s in data.streams) if v]
    common = dict(
        seq_len=data.seq_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
        mix=data.mix,
        skip_bad=data.skip_bad,
        image_cache=cache,
        fill_encoders=fill_encoders,
    )
    data_stream: type[DataStream] = DataStream
    if any(s.sharded for s in data.streams):  # each process reads its own part (training/streaming.py)
        from metalm.training.streaming import ShardedDataStream

        data_stream = ShardedDataStream
    train_stream = data_stream(
        train, processor, batch_size=batch_size, split="train", report=report, pack=data.pack, **common
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

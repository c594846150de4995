"""Training data: configured streams of records → semi-causal samples → padded batches.

Each stream's records (``metalm.data.records``) are held in memory (text and image *references*); token
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
fit is dropped with everything after it); one left with nothing to train on is skipped. Both are counted
in :attr:`DataStream.stats`.

Streams are mixed by ``weight`` with a seeded RNG, per sample or per batch (``data.mix``). Each stream reads
its records in a seeded permutation per epoch, every record once per epoch.

**One global sequence for any number of processes.** The samples form a single sequence that does not
depend on the number of processes: micro-batch ``g`` of the run is samples ``[g*G, (g+1)*G)`` with
``G = batch_size * world_size`` (the *global* micro-batch), and rank ``r`` trains on rows
``[r*batch_size, (r+1)*batch_size)`` of it. Every process walks the whole sequence (mixing draws, record
order, tokenization and packing are cheap and cached) but decodes images only for its own rows (unless
``skip_bad`` is on: then every process must see which images are bad to stay in step). So 2 processes ×
batch ``B`` see exactly the batches of 1 process × batch ``2B``, and the data state is global: a
checkpoint taken with one number of processes resumes with another.

All randomness comes from RNGs seeded with (seed, split, stream, counter), so
:meth:`DataStream.state_dict` is a few counters plus the packer's partial window, and
:meth:`DataStream.load_state_dict` resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metalm.data.audio import AudioError
from metalm.data.images import ImageError, ImagePreprocessor, load_image
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

__all__ = [
    "DataStream",
    "ImageCache",
    "StreamRecords",
    "build_data",
    "load_stream_records",
    "truncate_sample",
]

logger = logging.getLogger(__name__)

# 2: one global state for all processes (1 was per rank).
STATE_VERSION = 2
# Stands in for the pixels of an image on another process's row: never collated, never decoded here.
_NOT_DECODED = torch.empty(0)
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
    if split == "train":
        source, builtin_split = stream.source, stream.split
    else:
        source, builtin_split = stream.validation_source, stream.validation_split
        if source is None:
            if stream.source not in BUILTIN_DATASETS or stream.validation_split is None:
                return None
            source = stream.source
        builtin_split = builtin_split or "validation"
    if source in BUILTIN_DATASETS:
        records = load_builtin(source, builtin_split, kind=stream.kind)
    else:
        records = []
        report = report if report is not None else SkipReport()
        for rec in read_records(
            source, skip_bad=data.skip_bad, check_images=data.check_images, report=report
        ):
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
    records = _subsample(list(records), data.max_records)
    if not records:
        raise ValueError(f"stream {name!r} ({source}, {split}): no records")
    options = None
    if stream.format == "instruction" and any(isinstance(r, Classification) for r in records):
        if stream.options is not None:
            options = tuple(stream.options)
        elif split == "train":
            options = tuple(sorted({r.label for r in records if isinstance(r, Classification)}))
        else:  # validation prompts must list the same options as training ones
            options = load_stream_records(stream, data, "train").options
    return StreamRecords(name, stream.weight, records, stream, options)


# --------------------------------------------------------------------------------------------
# Images


def _tokenize(processor, text: str) -> list[int]:
    # verbose=False: a long document is fine here (it is packed), so no "longer than max length" warning.
    return processor.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


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


class _Packer:
    """`pack_documents` as a resumable object: the partial window and the document in progress are
    plain data (see `state`)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.buf: list[int] = []
        self.ranges: list[list[int]] = []
        self.docs: list[int] = []  # record index of each range, for the run's bookkeeping

    def add(self, ids: list[int], start: int, record: int) -> tuple[int, tuple | None]:
        """Feed `ids[start:]`; returns (new start, a full window or None)."""
        take = min(len(ids) - start, self.seq_len - len(self.buf))
        self.ranges.append([len(self.buf), len(self.buf) + take])
        self.docs.append(record)
        self.buf += ids[start : start + take]
        start += take
        if len(self.buf) == self.seq_len:
            window = (self.buf, [tuple(r) for r in self.ranges], self.docs)
            self.buf, self.ranges, self.docs = [], [], []
            return start, window
        return start, None

    def state(self) -> dict[str, Any]:
        return {"buf": list(self.buf), "ranges": [list(r) for r in self.ranges], "docs": list(self.docs)}

    def load(self, state: dict[str, Any]) -> None:
        self.buf = list(state["buf"])
        self.ranges = [list(r) for r in state["ranges"]]
        self.docs = list(state["docs"])


class _Stream:
    """One stream of the global sample sequence: its epoch order, caches, packer and counters."""

    def __init__(self, spec: StreamRecords, owner: DataStream) -> None:
        self.name = spec.name
        self.weight = spec.weight
        self.records = spec.records
        self.owner = owner
        self.config = spec.config or StreamConfig(source=spec.name)  # format and instruction templates
        self.instruction = self.config.format == "instruction"
        self.options = spec.options
        self.ids: dict[int, Any] = {}  # token cache, one entry per record
        self.bad: set[int] = set()  # records that failed (reported once, skipped afterwards)
        # Every window opens with BOS, as every other sample does: a pretrained decoder reads text that
        # starts without it badly (frozen Gemma-3: loss 8.3 on a news sentence without BOS, 2.8 with it).
        self.bos = [owner.processor.bos_token_id] if owner.processor.bos_token_id is not None else []
        self.packer = _Packer(owner.seq_len - len(self.bos))
        self.epoch = 0
        self.cursor = 0
        self.samples = 0
        self.doc: int | None = None  # text record in progress in the packer
        self.offset = 0
        self._order_epoch = -1
        self._order: list[int] = []

    # --- order and sharding ----------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The record indices of `epoch`, in reading order: a seeded permutation (the same on every rank)."""
        if epoch != self._order_epoch:
            perm = list(range(len(self.records)))
            random.Random(f"{self.owner.seed}:{self.owner.split}:{self.name}:order:{epoch}").shuffle(perm)
            self._order = perm
            self._order_epoch = epoch
        return self._order

    def _next_record(self) -> int:
        order = self.order(self.epoch)
        if self.cursor >= len(order):
            self.epoch += 1
            self.cursor = 0
            order = self.order(self.epoch)
        idx = order[self.cursor]
        self.cursor += 1
        return idx

    def _rng(self) -> random.Random:
        o = self.owner
        # The ":0:" is where a rank used to be (one sequence per rank); kept so a seed gives the data it
        # gave before.
        return random.Random(f"{o.seed}:{o.split}:{self.name}:0:sample:{self.samples}")

    # --- records → samples -------------------------------------------------------------------------
    def _bad(self, idx: int, err: Exception, field: str | None = None) -> None:
        rec = self.records[idx]
        rid = f" (id {rec.id})" if getattr(rec, "id", None) else ""
        error = RecordError(str(err), path=f"stream {self.name!r}, record {idx}{rid}", field=field)
        if not self.owner.skip_bad:
            raise error from err
        self.bad.add(idx)
        self.owner.report.add(error)
        if self.owner.rank == 0:  # every rank meets every record: one voice
            logger.warning("skipping bad record: %s", error)

    def _text_ids(self, idx: int) -> list[int]:
        ids = self.ids.get(idx)
        if ids is None:
            rec = self.records[idx]
            text = f"{rec.text}\ntopic: {rec.label}" if isinstance(rec, Classification) else rec.text
            ids = _tokenize(self.owner.processor, text)
            eos = self.owner.processor.eos_token_id
            ids = ids + ([eos] if eos is not None else [])
            self.ids[idx] = ids
        return ids

    def _image(self, idx: int, ref: str) -> torch.Tensor | None:
        o = self.owner
        if not o.decode_images:
            return _NOT_DECODED
        try:
            return o.image_cache.get(
                ref, o.image_pre, name=ref if not ref.startswith("data:") else "data URL"
            )
        except ImageError as err:
            self._bad(idx, err, field="image")
            return None

    def _speech(self, idx: int, ref: str) -> EncodedSegment | None:
        """The audio encoder's segment for clip `ref`, or None when the record is bad."""
        o = self.owner
        try:
            if o.audio is None:
                raise ValueError("the model has no audio encoder to hear this clip")
            spec = o.config.encoder_spec(o.audio)
            features = o.audio_cache.get(ref, o.processor.preprocessors[o.audio], spec["max_seconds"])
        except (AudioError, ValueError) as err:
            self._bad(idx, err, field="audio")
            return None
        return EncodedSegment(o.audio, payload=features)

    def _spoken_sample(self, idx: int, bos: Sample, eos: list[int]) -> Sample | None:
        """``[BOS] [image] [speech] prompt label [EOS]``, only ``label [EOS]`` trained: a spoken VQA question
        (or classification text) is heard, not rendered into a template."""
        o = self.owner
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
                _tokenize(o.processor, TARGET_DELIMITER + target) + eos,
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
        o = self.owner
        p = o.processor
        rec = self.records[idx]
        bos = [TextSegment([p.bos_token_id], loss=False)] if p.bos_token_id is not None else []
        eos = [p.eos_token_id] if p.eos_token_id is not None else []
        blind = o.vision is None  # no vision encoder (the GPT baseline): images are left out
        if isinstance(rec, VQAExample | Classification) and rec.audio is not None:
            return self._spoken_sample(idx, bos, eos)
        if self.instruction or isinstance(rec, VQAExample):  # VQA is an instruction sample in any format
            return self._instruction_sample(idx, rng, bos, eos, blind)
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
        o = self.owner
        if o.split == "train" and self.name not in o.warned_blind:
            o.warned_blind.add(self.name)
            logger.warning(
                "the model has no vision encoder: images in stream %r are left out (text-only baseline)",
                self.name,
            )

    # --- instruction samples (format: instruction; VQA always) ------------------------------------
    def _instruction_sample(
        self, idx: int, rng: random.Random, bos: Sample, eos: list[int], blind: bool
    ) -> Sample | None:
        """``[BOS] [image] Enc(template) prompt label [EOS]`` with only ``label [EOS]`` trained; without a
        text encoder (the GPT baseline) the rendered input is plain, untrained decoder text."""
        o = self.owner
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
            entry = self._render_instruction(idx, kind, templates[k], fields, target, with_image, bos, eos)
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
            o.stats["inputs_truncated"] = o.stats.get("inputs_truncated", 0) + 1
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
        eos: list[int],
    ) -> dict[str, Any] | None:
        """Token ids of one record under one template (cached by the caller). A classification text that
        does not fit is cut word by word (binary search) until the rendered input fits the text encoder's
        span limit and the whole sample fits ``seq_len``; any other input that exceeds the encoder's limit
        makes the record bad."""
        o = self.owner
        p = o.processor
        field = "question" if kind == "vqa" else "text"
        reason = check_template(template, kind)  # a JSONL stream without `kind` meets kinds only here
        if reason:
            self._bad(idx, ValueError(reason), field)
            return None
        prompt_text = self.config.decoder_prompt(kind)
        prompt = _tokenize(p, prompt_text) if prompt_text.strip() else []
        # The label follows the decoder text with a space, as evaluation scores " " + option.
        target_ids = _tokenize(p, TARGET_DELIMITER + target) + eos
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

        text = template.format_map(fields)
        dec, enc, in_encoder, in_window = measure(text)
        cut = False
        if kind == "classification" and not (in_encoder and in_window):
            words = fields["text"].split()

            def render(n: int) -> str:
                return template.format_map({**fields, "text": " ".join(words[:n])})

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
        o = self.owner
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

    def next_sample(self) -> tuple[Sample, list[int]]:
        """The next sample and the record indices it came from."""
        misses = 0
        while True:
            if self.doc is None:
                idx = self._next_record()
                if idx in self.bad:
                    misses += 1
                    if misses > len(self.records):
                        raise ValueError(f"stream {self.name!r}: every record is bad; nothing to train on")
                    continue
                rec = self.records[idx]
                # Instruction streams make one sample per record; only LM text is packed into windows.
                spoken = getattr(rec, "audio", None) is not None  # a spoken classification is no document
                if self.instruction or spoken or not isinstance(rec, TextDocument | Classification):
                    rng = self._rng()
                    self.samples += 1
                    sample = self._record_sample(idx, rng)
                    if sample is None:
                        misses += 1
                        continue
                    return sample, [idx]
                self.doc, self.offset = idx, 0
            ids = self._text_ids(self.doc)
            doc = self.doc
            self.offset, window = self.packer.add(ids, self.offset, doc)
            if self.offset >= len(ids):
                self.doc, self.offset = None, 0
            if window is not None:
                rng = self._rng()
                self.samples += 1
                buf, ranges, docs = window
                return self._window_sample(buf, ranges, rng), sorted(set(docs))

    def state(self) -> dict[str, Any]:
        return {
            "records": len(self.records),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "samples": self.samples,
            "doc": self.doc,
            "offset": self.offset,
            "packer": self.packer.state(),
            "bad": sorted(self.bad),
        }

    def load(self, state: dict[str, Any]) -> None:
        if state["records"] != len(self.records):
            raise ValueError(
                f"stream {self.name!r}: the checkpoint was taken with {state['records']} records, "
                f"the data now has {len(self.records)}; cannot resume the data position"
            )
        self.epoch, self.cursor, self.samples = state["epoch"], state["cursor"], state["samples"]
        self.doc, self.offset = state["doc"], state["offset"]
        self.packer.load(state["packer"])
        self.bad = set(state["bad"])


class DataStream:
    """An endless, resumable stream of batches mixed from several record streams, for one rank.

    ``next_batch()`` returns this rank's ``batch_size`` rows of the next global micro-batch
    (``batch_size * world_size`` samples, see the module docstring) as
    ``processor.collate(samples, padding_side="right")``; ``last_sources`` then holds (stream name, record
    indices) per row. With ``fill_encoders`` (FSDP: every rank must run the same sharded modules), an
    encoder that the global micro-batch uses but this rank's rows do not gets one extra *filler* row at
    the end: a tiny payload for each such encoder and no labels, so it adds nothing to the loss or the
    gradients. ``last_sources`` never lists it."""

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
        self.skip_bad = skip_bad
        self.fill_encoders = fill_encoders
        # False while building another rank's rows (their images are not needed here).
        self.decode_images = True
        self.split = split
        self.image_cache = image_cache or ImageCache()
        self.report = report if report is not None else SkipReport()
        texts = self.config.encoders_of_kind("text")
        visions = self.config.encoders_of_kind("vision")
        self.text_encoder: str | None = texts[0] if texts else None
        self.vision: str | None = visions[0] if visions else None
        self.image_pre = processor.image_processors[self.vision] if self.vision else None
        audios = self.config.encoders_of_kind("audio")
        self.audio: str | None = audios[0] if audios else None
        self.audio_cache = FeatureCache()
        self.semi_causal = dict(self.config.semi_causal)
        self.streams = [_Stream(s, self) for s in streams]
        self.names = [s.name for s in self.streams]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stream names must be unique, got {self.names}")
        self.weights = [s.weight for s in self.streams]
        self.warned_blind: set[str] = set()  # streams whose images were said to be left out
        self.draws = 0
        self.stats = {"samples": 0, "truncated": 0, "skipped_no_target": 0, "batches": 0}
        self.per_stream = dict.fromkeys(self.names, 0)
        self.last_sources: list[tuple[str, list[int]]] = []

    def shard_order(self, stream: str, epoch: int) -> list[int]:
        """The records of `stream`'s `epoch` that land on this rank's rows, in order, when `stream` is read
        alone and each record makes one sample (VQA, captions; text is packed into windows instead):
        position ``p`` of the epoch order goes to rank ``(p // batch_size) % world_size``."""
        order = self.streams[self.names.index(stream)].order(epoch)
        return [i for p, i in enumerate(order) if (p // self.batch_size) % self.world_size == self.rank]

    def to_encoder_ids(self, ids: list[int]) -> list[int]:
        return self.processor.to_encoder_ids(self.text_encoder, ids)

    def choose(self, draw: int) -> int:
        """The stream index of mixing draw number `draw` (a pure function of seed and draw)."""
        if len(self.streams) == 1:
            return 0
        rng = random.Random(f"{self.seed}:{self.split}:mix:0:{draw}")  # 0: see _Stream._rng
        return rng.choices(range(len(self.streams)), weights=self.weights)[0]

    def _draw(self) -> int:
        k = self.choose(self.draws)
        self.draws += 1
        return k

    def _sample_from(self, k: int) -> tuple[Sample, list[int]]:
        stream = self.streams[k]
        for _ in range(1000):
            sample, sources = stream.next_sample()
            if sample_length(sample, self.config) > self.seq_len:
                sample = truncate_sample(sample, self.seq_len, self.config)
                self.stats["truncated"] += 1
            if _has_target(sample, self.config):
                return sample, sources
            self.stats["skipped_no_target"] += 1
        raise ValueError(
            f"stream {stream.name!r}: 1,000 samples in a row had nothing to train on "
            f"(is seq_len {self.seq_len} too short for them?)"
        )

    def next_sample(self) -> tuple[Sample, str, list[int]]:
        """The next sample of the global sequence (mix per sample), with its stream name and record
        indices."""
        k = self._draw()
        sample, sources = self._sample_from(k)
        self.stats["samples"] += 1
        self.per_stream[self.names[k]] += 1
        return sample, self.names[k], sources

    def next_batch(self) -> dict:
        """This rank's rows of the next global micro-batch, collated."""
        samples, self.last_sources = [], []
        first = self.rank * self.batch_size
        mine = range(first, first + self.batch_size)
        used: set[str] = set()  # encoders of the global micro-batch
        own: set[str] = set()  # encoders of this rank's rows
        batch_stream = self._draw() if self.mix == "batch" else None
        try:
            for row in range(self.batch_size * self.world_size):
                # Another rank's row: build it (the sequence must advance identically everywhere) but
                # leave its images undecoded, unless bad images are skipped (all ranks must see them).
                self.decode_images = row in mine or self.skip_bad
                k = batch_stream if batch_stream is not None else self._draw()
                sample, sources = self._sample_from(k)
                self.stats["samples"] += 1
                self.per_stream[self.names[k]] += 1
                encoders = {seg.encoder for seg in sample if isinstance(seg, EncodedSegment)}
                used |= encoders
                if row in mine:
                    own |= encoders
                    samples.append(sample)
                    self.last_sources.append((self.names[k], sources))
        finally:
            self.decode_images = True
        self.stats["batches"] += 1
        if self.fill_encoders and used - own:
            samples.append(self._filler([e["name"] for e in self.config.encoders if e["name"] in used - own]))
        return self.processor.collate(samples, padding_side="right")

    def _filler(self, encoders: list[str]) -> Sample:
        """A label-free row with a minimal payload for each of `encoders` (see the class docstring)."""
        specs = [self.config.encoder_spec(name) for name in encoders]
        return [
            get_modality(spec["kind"]).filler(spec, self.processor.preprocessors[spec["name"]])
            for spec in specs
        ]

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.next_batch()

    def take(self, n: int) -> list[dict]:
        return [self.next_batch() for _ in range(n)]

    # --- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state of the global sequence (the same on every rank); `load_state_dict` on a stream
        built from the same records resumes exactly, with any number of processes."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "mix": self.mix,
            "draws": self.draws,
            "stats": dict(self.stats),
            "per_stream": dict(self.per_stream),
            "streams": {s.name: s.state() for s in self.streams},
            "skip_report": {"count": self.report.count, "items": [list(i) for i in self.report.items]},
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue the sequence where `state` left it. The state is global, so the number of processes
        may change; with ``strict`` the global micro-batch (``batch_size * world_size``) must stay the same
        (2 × 8 → 1 × 16 or 4 × 4), so the batch sequence continues exactly as it would have. With
        ``strict=False`` another global micro-batch is accepted: the *sample* sequence continues without
        duplicates or gaps, cut into batches of the new size."""
        state = copy.deepcopy(state)
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
        for s in self.streams:
            s.load(state["streams"][s.name])
        self.draws = state["draws"]
        self.stats = dict(state["stats"])
        self.per_stream = dict(state["per_stream"])
        self.report.count = state["skip_report"]["count"]
        self.report.items = [tuple(i) for i in state["skip_report"]["items"]]


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
    train_stream = DataStream(train, processor, batch_size=batch_size, split="train", report=report, **common)
    val_stream = (
        DataStream(
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

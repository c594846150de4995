"""Training samples: a stream's records → processor parts → a sample, through the one sample builder.

Serving's requests and evaluation's prompts become samples through ``MetaLMProcessor.build_sample``, each
part read by its kind's plugin (``Modality.segment``); training's records go the same way. What is
training's own stays here, as the parts it makes and thin wrappers around the builder:

- token ids are computed once per record and cached, and handed over as ``Tokens`` and ``Encode(ids=...)``
  parts (the processor would otherwise tokenise every record every epoch); decoded images and log-mel
  features are kept by the plugins' caches (``Modality.new_cache``), which ``build_sample`` hands on;
- loss masks: the trained label is a ``Tokens(..., loss=True)`` part, an encoded span carries ``loss``;
- semi-causal spans (:mod:`metalm.data.semicausal`): a text window's spans and an image-text caption's
  encoded prefix are drawn here and become ``Encode`` parts;
- in-context rows (:mod:`metalm.training.episodes`): each record's sample built without BOS, joined;
- a record the builder refuses (an unreadable image or clip) is reported as bad, naming its field.

What each record kind becomes is listed in :mod:`metalm.training.data`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from metalm.data.processor import InputError, Part, Tokens
from metalm.data.records import (
    AudioPart,
    AudioText,
    Classification,
    ImagePart,
    ImageText,
    Interleaved,
    Record,
    RecordError,
    TextPart,
    VQAExample,
)
from metalm.data.segments import Sample, TextSegment, sample_length
from metalm.data.semicausal import Word, prefix_cut, sample_spans
from metalm.modalities import encoders_of_field, media_fields, modality_of_field
from metalm.modalities.text import TEXT, Encode
from metalm.training.config import DEFAULT_PROMPTS, OPTIONS_JOINER, StreamConfig
from metalm.training.episode_rows import EpisodeRows
from metalm.training.episodes import EpisodeSampler
from metalm.training.instructions import InstructionError, render_instruction, target_ids

__all__ = [
    "BuildContext",
    "RecordParts",
    "RecordSamples",
    "Tally",
    "has_target",
    "payload_caches",
    "tokenize_words",
    "truncate_sample",
]

# A record whose parts name no model encoder for this field gets the old, plainer reason.


def tokenize_words(processor: Any, text: str) -> tuple[list[int], list[Word]]:
    """Token ids of ``text`` and its words (first token, has letters or digits), so that a caption prefix is
    cut between words. A slow tokenizer has no word map: each token is then a word."""
    tok = processor.tokenizer
    if not getattr(tok, "is_fast", False):
        ids = processor.tokenize(text)
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


def has_target(sample: Sample, config) -> bool:
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


def payload_caches(processor: Any, max_bytes: int) -> dict[str, Any]:
    """Each encoder kind's payload cache (decoded images, log-mel features), by kind, each holding at most
    `max_bytes`; kinds with nothing to keep have none."""
    caches = {}
    for spec in processor.config.encoders:
        cache = processor.plugin_of(spec["name"]).new_cache(max_bytes)
        if cache is not None:
            caches.setdefault(spec["kind"], cache)
    return caches


@dataclass
class BuildContext:
    """What building a sample reads: the processor, the model's encoders, the data settings, the payload
    caches. Shared by a DataStream's streams; what building finds goes to ``tally``."""

    processor: Any
    seq_len: int
    skip_bad: bool
    split: str
    caches: dict[str, Any]
    seed: int
    tally: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self.config = self.processor.config
        self.text_encoder: str | None = (self.config.encoders_of_kind(TEXT.kind) or [None])[0]
        # The first encoder reading each record field of media ("image", "audio"), None where there is none.
        self.field_encoders: dict[str, str | None] = {
            name: (encoders_of_field(self.config, name) or [None])[0] for name in media_fields()
        }
        self.image_encoder: str | None = self.field_encoders.get("image")
        self.semi_causal = dict(self.config.semi_causal)

    def left_out(self, record_field: str) -> bool:
        """Whether a record's input under `record_field` is left out: the model has no encoder for it and
        its plugin drops such inputs (images for a text-only baseline) rather than refusing the record."""
        modality = modality_of_field(record_field)
        return self.field_encoders.get(record_field) is None and modality.missing_encoder_error is None

    def span_limit(self) -> int:
        return TEXT.span_limit(self.config.encoder_spec(self.text_encoder))

    def encoder_ids(self, ids: list[int]) -> list[int]:
        """A decoder-token span in the text encoder's vocabulary."""
        return TEXT.to_encoder_ids(self.processor, self.text_encoder, ids)


@dataclass
class RecordParts:
    """A record as processor parts: ``fields`` names the record field each part came from (None for text),
    so a part the builder refuses makes the record bad under that field."""

    parts: list[Part]
    fields: list[str | None]
    eos: bool = False  # end with a trained EOS
    inputs_truncated: bool = False  # an instruction input was cut to fit


class RecordSamples(EpisodeRows):
    """The samples one stream's records make (the record side of :class:`metalm.training.stream.Stream`):
    token caches per record, the records found bad, and records → parts → ``processor.build_sample``."""

    name: str
    records: Any  # list[Record], or a sharded stream's held records by index
    origins: list[tuple[str, int | None] | None] | None
    ctx: BuildContext
    config: StreamConfig
    options: tuple[str, ...] | None
    seq_len: int

    def _init_samples(self) -> None:
        self.instruction = self.config.supervised
        self.caches = self.ctx.caches
        self.ids: dict[int, Any] = {}  # token cache, one entry per record
        self.twin_ids: dict[int, Any] = {}  # the typed twins' (typed_twin), apart: a spoken record's differ
        self.bad: set[int] = set()  # records that failed (reported once, skipped afterwards)
        self.warned = False  # said that the images of this stream are left out
        self._episodes: EpisodeSampler | None = None  # format: in_context (built on first use)
        # Every window opens with BOS, as every other sample does: a pretrained decoder reads text that
        # starts without it badly (frozen Gemma-3: loss 8.3 on a news sentence without BOS, 2.8 with it).
        bos = self.ctx.processor.bos_token_id
        self.bos = [bos] if bos is not None else []

    # --- bad records ---------------------------------------------------------------------------------
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

    def _warn_images_left_out(self) -> None:
        """Once per stream, and from the training data only (validation reads the same streams)."""
        if self.ctx.split == "train" and not self.warned:
            self.warned = True
            self.ctx.tally.notes.append(
                f"the model has no vision encoder: images in stream {self.name!r} are left out "
                "(text-only baseline)"
            )

    # --- parts → a sample ------------------------------------------------------------------------------
    def _build(self, idx: int, made: RecordParts | None, *, add_bos: bool = True) -> Sample | None:
        """The sample of record `idx`'s parts, through the processor; None (the record reported bad) when a
        part is refused."""
        if made is None:
            return None
        try:
            sample = self.ctx.processor.build_sample(
                made.parts, add_bos=add_bos, add_eos=made.eos, caches=self.caches
            )
        except InputError as err:
            field = made.fields[err.part] if getattr(err, "part", None) is not None else None
            modality = modality_of_field(field) if field is not None else None
            if (
                modality is not None
                and modality.missing_encoder_error
                and self.ctx.field_encoders[field] is None
            ):
                err = InputError(modality.missing_encoder_error)
            self._bad(idx, err, field)
            return None
        if made.inputs_truncated:
            self.ctx.tally.count("inputs_truncated")
        return sample

    def _record_sample(self, idx: int, rng: random.Random, *, add_bos: bool = True) -> Sample | None:
        return self._build(idx, self._record_parts(idx, rng), add_bos=add_bos)

    def _text_ids(self, idx: int) -> list[int]:
        """A text document's token ids, EOS at the end (classification: ``"<text>\\ntopic: <label>"``)."""
        ids = self.ids.get(idx)
        if ids is None:
            rec = self.records[idx]
            text = f"{rec.text}\ntopic: {rec.label}" if isinstance(rec, Classification) else rec.text
            eos = self.ctx.processor.eos_token_id
            ids = self.ids[idx] = self.ctx.processor.tokenize(text) + ([eos] if eos is not None else [])
        return ids

    # --- records → parts -------------------------------------------------------------------------------
    def _record_parts(self, idx: int, rng: random.Random) -> RecordParts | None:
        rec: Record = self.records[idx]
        if isinstance(rec, VQAExample | Classification) and rec.audio is not None:
            return self._spoken_parts(idx)
        if self.instruction or isinstance(rec, VQAExample):  # VQA is an instruction sample in any format
            return self._instruction_parts(idx, rng)
        if self.ctx.left_out("image") and isinstance(rec, ImageText | Interleaved):
            self._warn_images_left_out()
        if isinstance(rec, ImageText | AudioText):
            return self._captioned_parts(idx, rng)
        if isinstance(rec, Interleaved):
            return self._interleaved_parts(idx)
        raise TypeError(f"unexpected record {type(rec).__name__}")

    def _input_name(self, idx: int, ref: Any) -> str:
        """How errors name record `idx`'s input `ref`: its file, or "data URL"."""
        return "data URL" if isinstance(ref, str) and ref.startswith("data:") else ref

    def _medium_part(self, idx: int, ref: Any, record_field: str) -> Part:
        """Record `idx`'s input `ref` under `record_field` (an image, a clip) as its plugin's part."""
        modality = modality_of_field(record_field)
        encoder = self.ctx.field_encoders[record_field]
        return modality.record_part(ref, encoder, name=self._input_name(idx, ref))

    def _captioned_parts(self, idx: int, rng: random.Random) -> RecordParts:
        """Image (or speech, standing where the image does), an encoded caption prefix of random length,
        the causal rest (:func:`metalm.data.semicausal.prefix_cut`); a model without a vision encoder
        reads the caption alone."""
        ctx, rec = self.ctx, self.records[idx]
        cached = self.ids.get(idx)
        if cached is None:
            cached = self.ids[idx] = tokenize_words(ctx.processor, rec.text)
        ids, words = cached
        eos = [ctx.processor.eos_token_id] if ctx.processor.eos_token_id is not None else []
        where = "audio" if isinstance(rec, AudioText) else "image"  # the record field the medium is under
        if ctx.left_out(where):
            return RecordParts([Tokens(ids + eos, loss=True)], [None])
        parts, fields = [self._medium_part(idx, getattr(rec, where), where)], [where]
        if where == "audio":
            parts[0].transcript = ids  # what the clip says, for the transcript loss
        cut = prefix_cut(ids, rng, words) if ctx.text_encoder is not None else 0
        if cut:
            prefix = ids[:cut]
            enc = ctx.encoder_ids(prefix)
            parts.append(Encode(encoder=ctx.text_encoder, loss=True, ids=prefix, encoder_ids=enc))
            fields.append("text")
        parts.append(Tokens(ids[cut:] + eos, loss=True))
        return RecordParts(parts, [*fields, None])

    def _interleaved_parts(self, idx: int) -> RecordParts:
        """Text, images and speech in order, all text trained (images left out without a vision encoder)."""
        ctx, rec = self.ctx, self.records[idx]
        texts = self.ids.get(idx)
        if texts is None:
            texts = self.ids[idx] = [
                ctx.processor.tokenize(t.text) if isinstance(t, TextPart) else None for t in rec.parts
            ]
        parts, fields = [], []
        for part, ids in zip(rec.parts, texts):
            if isinstance(part, ImagePart | AudioPart):  # `type` names the field its input is under
                if ctx.left_out(part.type):
                    continue
                parts.append(self._medium_part(idx, getattr(part, part.type), part.type))
                fields.append(part.type)
            elif ids:
                parts.append(Tokens(ids, loss=True))
                fields.append(None)
        return RecordParts(parts, fields, eos=True)

    def _spoken_parts(self, idx: int) -> RecordParts:
        """``[BOS] [image] [speech] prompt label [EOS]``, only ``label [EOS]`` trained: a spoken VQA question
        (or classification text) is heard, not rendered into a template."""
        ctx, rec = self.ctx, self.records[idx]
        ids = self.ids.get(idx)
        if ids is None:
            target = rec.answers[0] if isinstance(rec, VQAExample) else rec.label
            prompt = self.config.decoder_prompt(rec.kind) or DEFAULT_PROMPTS["vqa"]
            said = rec.question if isinstance(rec, VQAExample) else rec.text  # for the transcript loss
            ids = self.ids[idx] = (
                ctx.processor.tokenize(prompt),
                target_ids(ctx.processor, target),
                ctx.processor.tokenize(said) if said else None,
            )
        parts: list[Part] = []
        fields: list[str | None] = []
        if isinstance(rec, VQAExample) and not ctx.left_out("image"):
            parts.append(self._medium_part(idx, rec.image, "image"))
            fields.append("image")
        elif isinstance(rec, VQAExample):
            self._warn_images_left_out()
        heard = self._medium_part(idx, rec.audio, "audio")
        heard.transcript = ids[2]
        parts += [heard, Tokens(ids[0]), Tokens(ids[1], loss=True)]
        return RecordParts(parts, [*fields, "audio", None, None])

    def twin_sample(self, idx: int, rng: random.Random) -> Sample | None:
        """A spoken question's typed twin: record `idx` as a typed instruction sample (its transcript through
        the text encoder), for the stream's `typed_twin` loss; None for a record with no transcript."""
        rec = self.records[idx]
        if not isinstance(rec, VQAExample) or rec.audio is None or not rec.question:
            return None
        return self._build(idx, self._instruction_parts(idx, rng, cache=self.twin_ids))

    def _instruction_parts(
        self, idx: int, rng: random.Random, cache: dict | None = None
    ) -> RecordParts | None:
        """``[BOS] [image] Enc(template) prompt label [EOS]`` with only ``label [EOS]`` trained; without a
        text encoder (the GPT baseline) the rendered input is plain, untrained decoder text."""
        ctx, rec = self.ctx, self.records[idx]
        blind = ctx.left_out("image")
        if isinstance(rec, Classification):
            if self.options is not None and rec.label not in self.options:
                reason = f"label {rec.label!r} is not one of the options {list(self.options)}"
                self._bad(idx, ValueError(reason), "label")
                return None
            fields = {"text": " ".join(rec.text.split()), "options": OPTIONS_JOINER.join(self.options or ())}
            kind, target, image = "classification", rec.label, None
        elif isinstance(rec, VQAExample):
            kind, fields, target, image = "vqa", {"question": rec.question}, rec.answers[0], rec.image
        elif isinstance(rec, ImageText):
            kind, fields, target, image = "image_text", {}, rec.text, rec.image
        else:
            reason = (
                f"a {rec.kind} record in a stream with format: instruction, which takes classification, "
                "vqa and image_text records"
            )
            self._bad(idx, ValueError(reason), "kind")
            return None
        if image is not None and blind:
            self._warn_images_left_out()
        with_image = image is not None and not blind
        templates = self.config.templates(kind)
        k = rng.randrange(len(templates)) if len(templates) > 1 else 0
        cache = (self.ids if cache is None else cache).setdefault(idx, {})
        entry = cache.get(k)
        if entry is None:
            slots = ctx.config.num_slots(ctx.image_encoder) if with_image else 0
            try:
                entry = render_instruction(
                    ctx.processor,
                    kind=kind,
                    template=templates[k],
                    prompt_text=self.config.decoder_prompt(kind),
                    fields=fields,
                    target=target,
                    budget=ctx.seq_len - len(self.bos) - slots,
                    text_encoder=ctx.text_encoder if self.config.encode_input else None,
                )
            except InstructionError as err:
                self._bad(idx, err, err.field)
                return None
            cache[k] = entry
        parts: list[Part] = [self._medium_part(idx, image, "image")] if with_image else []
        if entry.input and ctx.text_encoder and self.config.encode_input:
            parts.append(Encode(encoder=ctx.text_encoder, ids=entry.input, encoder_ids=entry.input_enc))
        elif entry.input:
            parts.append(Tokens(entry.input))
        if entry.prompt:
            parts.append(Tokens(entry.prompt))
        parts.append(Tokens(entry.target, loss=True))
        fields_of = ["image"] * with_image + [None] * (len(parts) - with_image)
        return RecordParts(parts, fields_of, inputs_truncated=entry.cut)

    # --- text windows (semi-causal LM) ------------------------------------------------------------------
    def _window_sample(self, ids: list[int], ranges: list[tuple[int, int]], rng: random.Random) -> Sample:
        """A packed window: random non-causal spans (the model's ``semi_causal`` settings) read by the text
        encoder, causal text between them; without a text encoder (the GPT baseline) plain causal text."""
        ctx = self.ctx
        if ctx.text_encoder is None:
            parts: list[Part] = [Tokens(list(ids), loss=True)]
        else:
            sc, limit = ctx.semi_causal, ctx.span_limit()
            span_max = min(sc["span_max"], limit)
            span_min = min(sc["span_min"], span_max)
            spans = sample_spans(ranges, span_min, span_max, sc["span_fraction"], rng)
            parts, pos = [], 0
            for start, end in spans:
                if start > pos:
                    parts.append(Tokens(ids[pos:start], loss=True))
                piece = ids[start:end]
                enc = ctx.encoder_ids(piece)
                # A span whose re-tokenization for another encoder vocabulary is empty or too long stays causal.
                if 0 < len(enc) <= limit:
                    parts.append(Encode(encoder=ctx.text_encoder, loss=True, ids=piece, encoder_ids=enc))
                else:
                    parts.append(Tokens(piece, loss=True))
                pos = end
            if pos < len(ids):
                parts.append(Tokens(ids[pos:], loss=True))
        return ctx.processor.build_sample(parts, add_bos=bool(self.bos), caches=self.caches)

    def _single_records(self) -> list[int]:
        raise NotImplementedError  # the stream's: records that make one sample each

    def _encoders_used(self, kinds: set[type]) -> set[str]:
        """The encoders one-record samples of these record types may use."""
        ctx = self.ctx
        images = bool(kinds & {ImageText, VQAExample, Interleaved})
        encoded_text = self.instruction or bool(kinds & {ImageText, VQAExample})
        return {
            e for e, used in ((ctx.image_encoder, images), (ctx.text_encoder, encoded_text)) if e and used
        }

"""In-context prompt assembly (docs/method.md, "In-context learning").

A prompt with k demonstrations is

    [image_1] Enc(input_1)  label_1  SEP  ...  [image_k] Enc(input_k)  label_k  SEP  [image_q] Enc(input_q)

each demonstration's *input* is its own encoded segment ("the encoder only sees one example each time"),
its *label* is plain decoder text, and a separator -- the paper's ``</s>``: by default the decoder's EOS
token id, or a configurable string -- closes each demonstration. The query's input is encoded last; the
decoder then scores options or generates.

``baseline=True`` (the GPT baseline, or a model without a text encoder) writes every input as plain decoder
text instead; images stay image segments. Demonstrations are sampled per (seed, example index) from the
task's demonstration split, so a run is reproducible and independent of ``limit`` and batching.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metalm.data.processor import InputError, MetaLMProcessor, Part, Target
from metalm.data.segments import Sample, TextSegment
from metalm.evaluation.tasks import Example, Task, TaskError
from metalm.modalities import media_fields, modality_of_field, modality_of_part
from metalm.modalities.base import shorten
from metalm.modalities.text import TEXT, Encode

__all__ = [
    "PromptPart",
    "Separator",
    "build_prompt",
    "describe_prompt",
    "encoder_fits",
    "has_text_encoder",
    "input_parts",
    "prompt_to_sample",
    "resolve_baseline",
    "sample_demonstrations",
    "split_for_encoder",
]


@dataclass(frozen=True)
class Separator:
    """The boundary after each demonstration. ``text=None``: the decoder's EOS token (one token id, never
    re-tokenized); otherwise that text as decoder tokens."""

    text: str | None = None


PromptPart = Part | Separator


# ---------------------------------------------------------------------------------------------------------
# Mode and demonstrations
# ---------------------------------------------------------------------------------------------------------
def has_text_encoder(model_or_config) -> bool:
    """True if the model (or MetaLMConfig) has a text encoder to put inputs in."""
    config = getattr(model_or_config, "config", model_or_config)
    return bool(config.encoders_of_kind("text"))


def resolve_baseline(model_or_config, baseline: bool | None) -> bool:
    """``baseline=None`` auto-detects: a model without a text encoder is evaluated in baseline mode.
    ``baseline=False`` on such a model is an error (there is nothing to encode the inputs with)."""
    has_enc = has_text_encoder(model_or_config)
    if baseline is None:
        return not has_enc
    if not baseline and not has_enc:
        raise TaskError("baseline=False needs a model with a text encoder; this model has none")
    return bool(baseline)


def sample_demonstrations(
    pool: Sequence[Example], k: int, *, seed: int, index: int, exclude_id: str | None = None
) -> list[Example]:
    """``k`` distinct demonstrations for query number ``index`` under ``seed`` (GPT-3 protocol: drawn at
    random per example). The query itself (``exclude_id``) is never its own demonstration."""
    if k <= 0:
        return []
    # A string seed hashes the same in every process (unlike hash() of a str).
    rng = random.Random(f"metalm-icl/{seed}/{index}")
    candidates = len(pool) - (1 if exclude_id is not None else 0)
    if k > candidates:
        raise TaskError(f"asked for {k} demonstrations but the pool holds only {candidates} candidates")
    picked: list[Example] = []
    seen: set[int] = set()
    while len(picked) < k:
        i = rng.randrange(len(pool))
        if i in seen or (exclude_id is not None and pool[i].id == exclude_id):
            seen.add(i)
            continue
        seen.add(i)
        picked.append(pool[i])
    return picked


# ---------------------------------------------------------------------------------------------------------
# Encoder limits
# ---------------------------------------------------------------------------------------------------------
def _text_encoder(processor: MetaLMProcessor, encoder: str | None) -> str:
    if encoder is not None:
        return encoder
    names = processor.config.encoders_of_kind("text")
    if len(names) != 1:
        raise InputError(f"the model has {len(names)} text encoders {names}; name one")
    return names[0]


def encoder_token_count(processor: MetaLMProcessor, text: str, encoder: str | None = None) -> int:
    """Tokens ``Encode(text)`` gives encoder ``encoder`` (counted as the processor counts them)."""
    return len(TEXT.encoder_ids(processor, _text_encoder(processor, encoder), text))


def encoder_fits(processor: MetaLMProcessor, encoder: str | None = None) -> Callable[[str], bool]:
    """``text -> bool``: does ``Encode(text)`` fit the text encoder (``TextModality.fits_encoder``)?"""
    name = _text_encoder(processor, encoder)
    return lambda text: TEXT.fits_encoder(processor, name, text)


def _largest_prefix(units: list[str], start: int, fits: Callable[[str], bool], joiner: str) -> int:
    """Largest n >= 0 with fits(joiner.join(units[start:start + n]))."""
    lo, hi = 0, len(units) - start
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(joiner.join(units[start : start + mid])):
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_for_encoder(processor: MetaLMProcessor, text: str, encoder: str | None = None) -> list[str]:
    """Cut ``text`` at word boundaries into pieces that each fit the text encoder (one ``Encode`` each).
    A single word longer than the limit is cut by characters."""
    fits = encoder_fits(processor, encoder)
    if fits(text):
        return [text] if text.strip() else []
    words = text.split()
    chunks: list[str] = []
    i = 0
    while i < len(words):
        n = _largest_prefix(words, i, fits, " ")
        if n == 0:  # one over-long word
            chars = list(words[i])
            pos = 0
            while pos < len(chars):
                m = max(1, _largest_prefix(chars, pos, fits, ""))
                chunks.append("".join(chars[pos : pos + m]))
                pos += m
            i += 1
            continue
        chunks.append(" ".join(words[i : i + n]))
        i += n
    return chunks


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------
def input_parts(
    task: Task,
    ex: Example,
    *,
    baseline: bool,
    fewshot: bool,
    fits: Callable[[str], bool] | None = None,
    images: bool = True,
) -> list[Part]:
    """An example's input: its image (if any, and if `images`: a model without a vision encoder, like the
    GPT baseline, is evaluated without them, as it was trained), then its rendered input text --
    ``Encode``-d, or plain decoder text in baseline mode -- then the task's decoder prompt, if any."""
    parts: list[Part] = []
    for record_field in media_fields():  # an image, then speech: each input the example carries
        value = getattr(ex, record_field, None)
        if value is not None and (images or record_field != "image"):
            parts.append(modality_of_field(record_field).part(value))
    text = task.render_input(ex, fewshot=fewshot, fits=None if baseline else fits)
    if text.strip():
        parts.append(text if baseline else Encode(text))
    if not parts and (images or ex.image is None):  # (a clip is a part: it never lands here)
        raise TaskError(f"task {task.name!r}, example {ex.id!r}: empty input (no text and no image)")
    prompt = task.render_decoder_prompt(fewshot=fewshot)
    if prompt.strip():
        parts.append(prompt)
    return parts


def build_prompt(
    task: Task,
    query: Example,
    demonstrations: Sequence[Example] = (),
    *,
    baseline: bool = False,
    separator: str | None = None,
    fits: Callable[[str], bool] | None = None,
    images: bool = True,
) -> list[PromptPart]:
    """The prompt for ``query`` after ``demonstrations`` (see the module docstring). ``separator=None``
    uses the decoder's EOS token; ``fits`` shortens over-long encoder inputs (see ``Task.render_input``);
    ``images=False`` leaves images out (a model without a vision encoder)."""
    fewshot = bool(demonstrations)
    parts: list[PromptPart] = []
    for demo in demonstrations:
        parts += input_parts(task, demo, baseline=baseline, fewshot=True, fits=fits, images=images)
        parts.append(task.render_target(task.label(demo)))
        parts.append(Separator(separator))
    parts += input_parts(task, query, baseline=baseline, fewshot=fewshot, fits=fits, images=images)
    return parts


def prompt_to_sample(
    processor: MetaLMProcessor, parts: Sequence[PromptPart], *, add_bos: bool = True, index: int = 0
) -> Sample:
    """Segments of a prompt: runs of ordinary parts go through ``processor.build_sample`` (BOS only at the
    start); a :class:`Separator` becomes an unscored decoder segment."""
    sample: Sample = []
    run: list[Part] = []
    first = True

    def flush() -> None:
        nonlocal first
        if run:
            sample.extend(processor.build_sample(list(run), add_bos=add_bos and first, index=index))
            run.clear()
            first = False

    for part in parts:
        if isinstance(part, Separator):
            flush()
            if part.text is None:
                if processor.eos_token_id is None:
                    raise InputError("the decoder tokenizer has no EOS/SEP token; pass a separator string")
                ids = [processor.eos_token_id]
            else:
                ids = processor.tokenize(part.text)
            if first and add_bos and processor.bos_token_id is not None:
                sample.append(TextSegment([processor.bos_token_id], loss=False))
            first = False
            if ids:
                sample.append(TextSegment(ids, loss=False))
        else:
            run.append(part)
    flush()
    if not sample and processor.bos_token_id is not None:
        # An image-only input for a model that cannot see images: the prompt is just the start token.
        sample.append(TextSegment([processor.bos_token_id], loss=False))
    return sample


def describe_prompt(parts: Sequence[PromptPart], *, max_chars: int = 80) -> str:
    """A one-line summary: ``<image:3.png> [enc: question: ... answer:] red </s> ...``."""

    out = []
    for part in parts:
        modality = modality_of_part(part)
        if isinstance(part, Separator):
            out.append("</s>" if part.text is None else repr(part.text))
        elif isinstance(part, Target):
            out.append(f"<target: {shorten(part.text, max_chars)}>")
        elif modality is not None:  # each kind renders its own parts
            out.append(modality.describe_part(part, max_chars))
        else:
            out.append(shorten(str(part), max_chars))
    return " ".join(out)

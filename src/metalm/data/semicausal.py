"""Semi-causal sampling (docs/method.md): packed documents → random non-causal spans → segments."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from metalm.data.segments import EncodedSegment, Sample, TextSegment

ToEncoderIds = Callable[[list[int]], list[int]]


def pack_documents(
    documents: Iterable[list[int]], seq_len: int, eos_id: int | None = None
) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
    """Full-sentence packing: concatenate documents (each followed by `eos_id`) and cut `seq_len` windows.

    Yields `(ids, doc_ranges)` with `doc_ranges` the `[start, end)` pieces of each document inside the
    window, so that spans can be kept inside one document. The tail that does not fill a window is dropped.
    """
    buf: list[int] = []
    ranges: list[tuple[int, int]] = []
    for doc in documents:
        doc = list(doc) + ([eos_id] if eos_id is not None else [])
        while doc:
            take = min(len(doc), seq_len - len(buf))
            ranges.append((len(buf), len(buf) + take))
            buf += doc[:take]
            doc = doc[take:]
            if len(buf) == seq_len:
                yield buf, ranges
                buf, ranges = [], []


def sample_spans(
    doc_ranges: list[tuple[int, int]],
    span_min: int,
    span_max: int,
    fraction: float,
    rng: random.Random,
    max_tries: int = 50,
) -> list[tuple[int, int]]:
    """Random non-overlapping `[start, end)` spans: lengths uniform in [span_min, span_max] (shorter only
    where a document is shorter), together about `fraction` of the tokens, never crossing a document
    boundary, never at position 0 (the position before a span predicts its first token) and always with
    a causal token between two spans."""
    total = sum(e - s for s, e in doc_ranges)
    target = fraction * total
    spans: list[tuple[int, int]] = []
    covered = 0
    # Documents long enough to host a span, with one causal token before it.
    docs = [(max(s, 1), e) for s, e in doc_ranges if e - max(s, 1) >= span_min]
    while docs and covered + span_min / 2 < target:
        length = rng.randint(span_min, span_max)
        length = min(length, max(span_min, round(target - covered)))
        for _ in range(max_tries):
            s, e = rng.choice(docs)
            length_here = min(length, e - s)
            start = rng.randint(s, e - length_here)
            end = start + length_here
            # Keep a causal gap of one token on each side of the new span.
            if all(end + 1 <= a or start >= b + 1 for a, b in spans):
                spans.append((start, end))
                covered += end - start
                break
        else:
            break
    return sorted(spans)


def semicausal_sample(
    ids: list[int],
    spans: list[tuple[int, int]],
    encoder: str,
    to_encoder_ids: ToEncoderIds,
) -> Sample:
    """Cut a token sequence at its spans: causal text segments between encoded text spans. Each span keeps
    its decoder ids as `target_ids`, so its first token is predicted before it."""
    sample: Sample = []
    pos = 0
    for start, end in spans:
        if start > pos:
            sample.append(TextSegment(ids[pos:start]))
        piece = ids[start:end]
        sample.append(EncodedSegment(encoder, input_ids=to_encoder_ids(piece), target_ids=piece))
        pos = end
    if pos < len(ids):
        sample.append(TextSegment(ids[pos:]))
    return sample


class Word(NamedTuple):
    """A word of a tokenized text: the index of its first token, and whether it carries content (letters or
    digits; punctuation does not)."""

    start: int
    informative: bool


# Share of image-text samples whose caption is all causal (no encoded prefix). Captioning at evaluation is
# this format (the image alone, or an encoded instruction that is not part of the caption), and a prefix
# can hand over what the image should (in "a red | circle." the colour arrives through the text encoder).
PREFIX_FREE_SHARE = 0.5


def prefix_cuts(words: Sequence[Word], n_tokens: int, max_fraction: float) -> list[int]:
    """Token indices where an encoded caption prefix may end (0, no prefix, excluded).

    A cut falls only at a word start: a causal rest that opens with a continuation piece (``tea | ##l``)
    teaches the decoder to begin a caption with one. The prefix holds at most ``max_fraction`` of the
    *informative* words (punctuation does not count), so on a short caption it never eats the content
    ("a red circle.": at most "a"), and at least one token stays causal."""
    budget = int(max_fraction * sum(w.informative for w in words))
    cuts: list[int] = []
    seen = 0  # informative words before the current word (= in the prefix if we cut here)
    for word in words:
        if seen > budget or word.start >= n_tokens:
            break
        if word.start > 0:
            cuts.append(word.start)
        seen += word.informative
    return cuts


def prefix_cut(
    text_ids: list[int],
    rng: random.Random,
    words: Sequence[Word] | None = None,
    max_prefix_fraction: float = 0.5,
    prefix_free: float = PREFIX_FREE_SHARE,
) -> int:
    """Where a caption's encoded prefix ends (0: no prefix), drawn as :func:`image_text_sample` describes."""
    if rng.random() < prefix_free:
        return 0
    if words is None:
        words = [Word(i, True) for i in range(len(text_ids))]
    return rng.choice([0, *prefix_cuts(words, len(text_ids), max_prefix_fraction)])


def image_text_sample(
    pixel_values: torch.Tensor | EncodedSegment,
    text_ids: list[int],
    vision_encoder: str,
    rng: random.Random,
    *,
    text_encoder: str | None = None,
    to_encoder_ids: ToEncoderIds | None = None,
    words: Sequence[Word] | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_prefix_fraction: float = 0.5,
    prefix_free: float = PREFIX_FREE_SHARE,
) -> Sample:
    """Vision-language pre-training sample: image → encoded text prefix of random length → causal rest.
    ``pixel_values`` may also be a ready segment of another medium (speech: an audio encoder's segment),
    which then stands where the image does.

    A share ``prefix_free`` of samples has no prefix; the others take a cut drawn uniformly from no prefix
    and :func:`prefix_cuts` (the paper's random length in [0, max_prefix_fraction], counted in words).
    ``words``: the text's words (default: each token a word, for text without a tokenizer word map).
    With no text encoder the whole text is causal."""
    sample: Sample = []
    if bos_id is not None:
        sample.append(TextSegment([bos_id]))
    if isinstance(pixel_values, EncodedSegment):
        sample.append(pixel_values)
    else:
        sample.append(EncodedSegment(vision_encoder, pixel_values=pixel_values))
    cut = 0
    if text_encoder is not None:
        cut = prefix_cut(text_ids, rng, words, max_prefix_fraction, prefix_free)
    if cut:
        prefix = text_ids[:cut]
        sample.append(EncodedSegment(text_encoder, input_ids=to_encoder_ids(prefix), target_ids=prefix))
    rest = text_ids[cut:] + ([eos_id] if eos_id is not None else [])
    sample.append(TextSegment(rest))
    return sample

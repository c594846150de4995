"""Semi-causal sampling (DESIGN.md §2): packed documents → random non-causal spans → segments."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

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


def image_text_sample(
    pixel_values: torch.Tensor,
    text_ids: list[int],
    vision_encoder: str,
    rng: random.Random,
    *,
    text_encoder: str | None = None,
    to_encoder_ids: ToEncoderIds | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    max_prefix_fraction: float = 0.5,
) -> Sample:
    """Vision-language pre-training sample: image → encoded text prefix of random length → causal rest.

    The prefix length is uniform in [0, max_prefix_fraction × len(text)], leaving at least one causal token;
    with no text encoder the whole text is causal."""
    sample: Sample = []
    if bos_id is not None:
        sample.append(TextSegment([bos_id]))
    sample.append(EncodedSegment(vision_encoder, pixel_values=pixel_values))
    cut = 0
    if text_encoder is not None and len(text_ids) > 1:
        cut = rng.randint(0, min(len(text_ids) - 1, int(max_prefix_fraction * len(text_ids))))
    if cut:
        prefix = text_ids[:cut]
        sample.append(EncodedSegment(text_encoder, input_ids=to_encoder_ids(prefix), target_ids=prefix))
    rest = text_ids[cut:] + ([eos_id] if eos_id is not None else [])
    sample.append(TextSegment(rest))
    return sample

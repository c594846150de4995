"""The semi-causal span sampler and packing: statistics over many draws, determinism, boundaries."""

from __future__ import annotations

import random

import torch

from metalm.data.segments import EncodedSegment, TextSegment
from metalm.data.semicausal import image_text_sample, pack_documents, sample_spans, semicausal_sample


def _docs(rng: random.Random, n: int = 20) -> list[list[int]]:
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(5, 400))] for _ in range(n)]


def test_pack_documents_windows_and_ranges():
    docs = [[1] * 5, [2] * 7, [3] * 10]
    windows = list(pack_documents(docs, seq_len=8, eos_id=0))
    assert [len(ids) for ids, _ in windows] == [8, 8, 8]  # 25 tokens with EOS → 3 full windows, tail dropped
    ids, ranges = windows[0]
    assert ids == [1] * 5 + [0] + [2, 2] and ranges == [(0, 6), (6, 8)]
    for ids, ranges in windows:
        assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_span_statistics_over_many_draws():
    rng = random.Random(0)
    covered = total = 0
    lengths = []
    for ids, ranges in pack_documents(_docs(random.Random(1), 200), seq_len=512, eos_id=0):
        spans = sample_spans(ranges, 16, 32, 0.25, rng)
        for (s, e), nxt in zip(spans, spans[1:] + [(10**9, 10**9)]):
            lengths.append(e - s)
            assert s >= 1, "a span never starts at position 0"
            assert e + 1 <= nxt[0], "spans never touch: a causal token separates them"
            assert any(a <= s and e <= b for a, b in ranges), "a span never crosses a document boundary"
        covered += sum(e - s for s, e in spans)
        total += len(ids)
    assert min(lengths) >= 1 and max(lengths) <= 32
    in_range = sum(16 <= n <= 32 for n in lengths) / len(lengths)
    assert in_range > 0.85  # shorter only where a document or the remaining budget is shorter
    assert abs(covered / total - 0.25) < 0.03


def test_paper_defaults_on_long_documents():
    rng = random.Random(0)
    ranges = [(0, 2048)]
    fractions = []
    for _ in range(50):
        spans = sample_spans(ranges, 64, 128, 0.25, rng)
        fractions.append(sum(e - s for s, e in spans) / 2048)
        assert all(64 <= e - s <= 128 for s, e in spans[:-1])
    assert abs(sum(fractions) / len(fractions) - 0.25) < 0.02


def test_same_seed_same_spans():
    docs = list(pack_documents(_docs(random.Random(2)), seq_len=256, eos_id=0))
    draw = lambda seed: [sample_spans(r, 8, 16, 0.25, random.Random(seed)) for _, r in docs]  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_short_documents_get_no_spans():
    assert sample_spans([(0, 5), (5, 9)], 8, 16, 0.25, random.Random(0)) == []


def test_semicausal_sample_round_trips_tokens():
    ids = list(range(100, 140))
    spans = [(3, 9), (20, 25)]
    sample = semicausal_sample(ids, spans, "text", lambda x: [i + 1 for i in x])
    kinds = [type(s).__name__ for s in sample]
    assert kinds == ["TextSegment", "EncodedSegment", "TextSegment", "EncodedSegment", "TextSegment"]
    rebuilt = [t for s in sample for t in (s.ids if isinstance(s, TextSegment) else s.target_ids)]
    assert rebuilt == ids
    assert sample[1].input_ids == [i + 1 for i in ids[3:9]]


def test_image_text_sample_layout():
    rng = random.Random(0)
    pix = torch.zeros(3, 8, 8)
    seen_prefix = 0
    for _ in range(50):
        sample = image_text_sample(
            pix,
            list(range(10, 20)),
            "vision",
            rng,
            text_encoder="text",
            to_encoder_ids=list,
            bos_id=1,
            eos_id=2,
        )
        assert isinstance(sample[0], TextSegment) and sample[0].ids == [1]
        assert isinstance(sample[1], EncodedSegment) and sample[1].encoder == "vision"
        assert isinstance(sample[-1], TextSegment) and sample[-1].ids[-1] == 2 and len(sample[-1].ids) >= 2
        if len(sample) == 4:
            seen_prefix += 1
            assert sample[2].encoder == "text" and sample[2].target_ids == list(
                range(10, 10 + len(sample[2].target_ids))
            )
    assert 10 < seen_prefix < 50

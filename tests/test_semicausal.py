"""The semi-causal span sampler and packing: statistics over many draws, determinism, boundaries."""

from __future__ import annotations

import random

import torch

from metalm.data.segments import EncodedSegment, TextSegment
from metalm.data.semicausal import (
    Word,
    image_text_sample,
    pack_documents,
    prefix_cuts,
    sample_spans,
    semicausal_sample,
)


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


def test_prefix_cuts_never_split_a_word():
    """Cuts fall only at word starts, whatever the tokenizer splits: "teal" is `tea ##l` in MiniLM's
    vocabulary, and a rest that opens with `##l` would teach the decoder to begin a caption with it."""
    from metalm.recipe import load_tokenizer
    from metalm.training.samples import tokenize_words as _tokenize_words

    class Processor:
        tokenizer = load_tokenizer("packaged:minilm-l6")

    tok = Processor.tokenizer
    rng = random.Random(0)
    texts = [
        "a teal circle.",
        "a red rectangle.",
        "there is a teal circle in the image.",
        "unbelievably teal",
    ]
    for text in texts:
        ids, words = _tokenize_words(Processor, text)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        for _ in range(40):
            sample = image_text_sample(
                torch.zeros(3, 8, 8), ids, "vision", rng, text_encoder="text", to_encoder_ids=list,
                words=words, prefix_free=0.0,
            )  # fmt: skip
            rest = sample[-1].ids
            assert not tok.convert_ids_to_tokens(rest[0]).startswith("##"), (text, rest)
            if len(sample) == 3:  # the prefix never eats the content of a short caption
                prefix = tok.decode(sample[1].target_ids)
                assert len(prefix.split()) <= len(text.split()) // 2, (text, prefix)


def test_prefix_cuts_budget_counts_informative_words():
    words = [Word(0, True), Word(1, True), Word(3, True), Word(4, False)]  # a | tea ##l | circle | .
    assert prefix_cuts(words, 5, 0.5) == [1]  # 3 informative words: at most 1 in the prefix
    assert prefix_cuts(words, 5, 1.0) == [1, 3, 4]
    assert prefix_cuts([Word(0, True)], 1, 0.5) == []  # one word: nothing to encode


def test_prefix_free_share():
    rng = random.Random(0)
    words = [Word(i, True) for i in range(8)]
    free = sum(
        len(image_text_sample(torch.zeros(3, 8, 8), list(range(8)), "v", rng, text_encoder="t",
                              to_encoder_ids=list, words=words, prefix_free=0.5)) == 2
        for _ in range(2000)
    )  # fmt: skip
    # 1/2 prefix-free outright, and 1/5 of the rest draw the empty prefix among 0..4 words.
    assert abs(free / 2000 - (0.5 + 0.5 / 5)) < 0.04

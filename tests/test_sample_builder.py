"""Training samples are built through the one sample builder (``MetaLMProcessor.build_sample``), and stay
what they were: the first samples of each record kind, for a fixed seed, against a stored fixture
(``tests/data/training_samples.json``, written by the code before the builder was shared and checked
token for token against it; regenerate with ``METALM_WRITE_FIXTURE=1`` only for an intended change)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from metalm.data.segments import TextSegment
from metalm.training.config import DataConfig
from metalm.training.data import build_data

FIXTURE = Path(__file__).parent / "data" / "training_samples.json"
RECORDS = [
    {"text": "The cat sat on the mat. It was a sunny day and the birds were singing in the trees nearby."},
    {"kind": "classification", "text": "Stocks rose sharply after the bank cut rates.", "label": "business"},
    {"kind": "classification", "text": "The team won the cup final in extra time.", "label": "sport"},
    {"image": "red.png", "text": "a red square on a white background, drawn large"},
    {"kind": "vqa", "image": "blue.png", "question": "what color is the shape?", "answer": "blue"},
    {"content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "this is red."}]},
    {"image": "missing.png", "text": "gone"},
    {"kind": "classification", "text": " ".join(["word"] * 200), "label": "sport"},
]


def _describe(sample) -> list:
    out = []
    for i, seg in enumerate(sample):
        if isinstance(seg, TextSegment):
            out.append(["T", list(seg.ids), bool(seg.loss) if i else None])  # position 0 is never predicted
        elif isinstance(seg.payload, torch.Tensor):
            payload = [list(seg.payload.shape), round(float(seg.payload.double().sum()), 3)]
            out.append(["E", seg.encoder, payload, seg.target_ids, seg.loss])
        else:
            out.append(["E", seg.encoder, list(seg.payload), seg.target_ids, seg.loss])
    return out


def _samples(processor, folder: Path) -> dict:
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(folder / "blue.png")
    (folder / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (folder / "sup.jsonl").write_text("".join(json.dumps(RECORDS[i]) + "\n" for i in (1, 2, 3, 4, 7)))
    sup = str(folder / "sup.jsonl")
    streams = [
        {"name": "lm", "source": str(folder / "all.jsonl")},
        {"name": "instruction", "source": sup, "format": "instruction"},
        {"name": "in_context", "source": sup, "format": "in_context", "in_context": {"shots": [1, 2]}},
    ]
    data = DataConfig(streams=streams, seq_len=48, skip_bad=True)
    train, _ = build_data(data, processor, batch_size=2, seed=3)
    out = {
        s.name: [[_describe(x), used] for x, used in (s.next_sample() for _ in range(6))]
        for s in train.streams
    }
    out["report"] = [[str(i).replace(str(folder), "<dir>") for i in item[2:]] for item in train.report.items]
    return out


def test_training_samples_are_unchanged(tiny, tmp_path):
    _, processor = tiny
    got = json.loads(json.dumps(_samples(processor, tmp_path)))
    if os.environ.get("METALM_WRITE_FIXTURE"):
        FIXTURE.write_text(json.dumps(got, separators=(",", ":")))
    assert got == json.loads(FIXTURE.read_text())


def test_training_samples_go_through_the_processor(tiny, tmp_path, monkeypatch):
    _, processor = tiny
    calls = []
    real = type(processor).build_sample

    def counted(self, parts, **kw):
        calls.append([type(p).__name__ for p in parts])
        return real(self, parts, **kw)

    monkeypatch.setattr(type(processor), "build_sample", counted)
    _samples(processor, tmp_path)
    kinds = {name for parts in calls for name in parts}
    assert {"Tokens", "Encode", "ImageInput"} <= kinds


def test_an_unencoded_instruction_stream_gives_the_input_as_untrained_decoder_tokens(tiny, tmp_path):
    _, processor = tiny
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "vqa.jsonl").write_text(json.dumps(RECORDS[4]) + "\n")
    built = {}
    for encode in (True, False):
        stream = {"source": str(tmp_path / "vqa.jsonl"), "format": "instruction", "encode_input": encode}
        train, _ = build_data(DataConfig(streams=[stream], seq_len=48), processor, batch_size=1, seed=0)
        built[encode] = train.streams[0].next_sample()[0]
    encoded = [seg.encoder for seg in built[True] if not isinstance(seg, TextSegment)]
    plain = [seg for seg in built[False] if not isinstance(seg, TextSegment) and seg.encoder != "vision"]
    assert "text" in encoded and not plain  # the question no longer goes through the text encoder
    question = processor.tokenizer("question: what color is the shape?", add_special_tokens=False)[
        "input_ids"
    ]
    texts = [seg for seg in built[False] if isinstance(seg, TextSegment)]
    assert [list(seg.ids) for seg in texts if list(seg.ids) == question] and not any(
        seg.loss for seg in texts if list(seg.ids) == question
    )
    assert processor.decode(built[False][-1].ids) == processor.decode(built[True][-1].ids)  # same label


def test_the_processor_tokenises_a_short_text_once_and_hands_out_fresh_lists(tiny, monkeypatch):
    _, p = tiny
    real, calls = p.tokenizer, []

    def counting(text, **kwargs):
        calls.append(text)
        return real(text, **kwargs)

    monkeypatch.setattr(p, "tokenizer", counting)
    text = "is there a teal shape in this particular image?"
    expected = real(text, add_special_tokens=False)["input_ids"]
    first = p.tokenize(text)
    first.append(-1)  # a caller's edit must not reach the next caller
    assert p.tokenize(text) == expected and calls == [text]
    long_text = "a long document " * 40  # over the memo's length: tokenised each time, the same ids
    assert (
        p.tokenize(long_text)
        == p.tokenize(long_text)
        == real(long_text, add_special_tokens=False)["input_ids"]
    )
    assert calls.count(long_text) == 2

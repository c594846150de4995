"""Training data streams: packing matches `pack_documents`, semi-causal spans stay inside documents,
mixing follows the stream weights, rank shards have no duplicates or gaps, the data state resumes exactly,
the VQA sample layout and truncation, bad records raised or counted, and text-only models leaving images
out. The `gpt_processor` fixture is in conftest.py; `tiny_config` and the record helpers in
tests/training_helpers.py."""

from __future__ import annotations

import json

import pytest

from metalm.data.records import ImageText, RecordError
from metalm.data.segments import EncodedSegment, TextSegment
from metalm.data.semicausal import pack_documents
from metalm.training.config import config_from_dict
from metalm.training.data import DataStream, StreamRecords, build_data, truncate_sample
from tests.training_helpers import batches_equal, text_records, tiny_config


def test_packing_matches_pack_documents(gpt_processor):
    p = gpt_processor
    records = text_records(30)
    data = DataStream([StreamRecords("t", 1.0, records)], p, seq_len=16, batch_size=1, seed=3)
    order = data.shard_order("t", 0)
    docs = [p.tokenize(records[i].text) for i in order]
    bos = [p.bos_token_id] if p.bos_token_id is not None else []
    expected = list(pack_documents(docs, 16 - len(bos), eos_id=p.eos_token_id))
    got = [data.next_sample()[0] for _ in range(len(expected))]
    # No text encoder (the GPT baseline): a window is BOS (untrained) and one causal text segment.
    head = [bos] if bos else []
    assert [[seg.ids for seg in s] for s in got] == [[*head, ids] for ids, _ in expected]
    assert all(isinstance(seg, TextSegment) for s in got for seg in s)
    assert all(not s[0].loss for s in got) or not bos


def test_semicausal_windows_keep_spans_inside_documents(tiny):
    _, p = tiny
    records = text_records(40, seed=1)
    data = DataStream([StreamRecords("t", 1.0, records)], p, seq_len=32, batch_size=1, seed=0)
    order = data.shard_order("t", 0)
    # Windows are one token shorter: each opens with BOS (not part of the packed documents).
    expected = list(pack_documents([p.tokenize(records[i].text) for i in order], 31, eos_id=p.eos_token_id))
    n_spans = 0
    for ids, ranges in expected:
        sample, _, _ = data.next_sample()
        assert sample[0].ids == [p.bos_token_id] and not sample[0].loss
        flat, pos = [], 0
        for seg in sample[1:]:
            if isinstance(seg, EncodedSegment):
                assert 2 <= len(seg.input_ids) <= 6 or any(e - s < 2 for s, e in ranges)
                assert seg.input_ids == seg.target_ids  # shared vocabulary
                assert any(s <= pos and pos + len(seg.target_ids) <= e for s, e in ranges), (
                    "span crosses a document"
                )
                assert pos > 0
                n_spans += 1
                flat += seg.target_ids
            else:
                flat += seg.ids
            pos = len(flat)
        assert flat == ids
    assert n_spans > 0


def test_mixing_follows_weights(gpt_processor):
    streams = [StreamRecords("a", 1.0, text_records(20, 1)), StreamRecords("b", 3.0, text_records(20, 2))]
    data = DataStream(streams, gpt_processor, seq_len=8, batch_size=1, seed=0)
    draws = [data.choose(k) for k in range(20000)]
    assert abs(draws.count(1) / len(draws) - 0.75) < 0.015
    names = [data.next_sample()[1] for _ in range(2000)]
    assert abs(names.count("b") / len(names) - 0.75) < 0.04
    # Per-batch mixing: every row of a batch comes from one stream.
    per_batch = DataStream(streams, gpt_processor, seq_len=8, batch_size=4, seed=0, mix="batch")
    for _ in range(20):
        per_batch.next_batch()
        assert len({name for name, _ in per_batch.last_sources}) == 1


def test_rank_sharding_has_no_duplicates_or_gaps(tiny):
    from metalm.data.builtin import load_builtin

    _, p = tiny
    records = load_builtin("easy_vqa_vqa", "validation")[:30]
    world = 3
    seen = []
    for rank in range(world):
        data = DataStream(
            [StreamRecords("vqa", 1.0, records)],
            p,
            seq_len=64,
            batch_size=5,
            seed=7,
            rank=rank,
            world_size=world,
        )
        rank_seen = []
        for _ in range(2):  # 2 batches x 5 = one epoch of this rank's 10 records
            batch = data.next_batch()
            assert batch["encoder_inputs"]["vision"]["pixel_values"].shape[0] == 5
            rank_seen += [i for _, ids in data.last_sources for i in ids]
        assert len(rank_seen) == len(set(rank_seen)) == 10
        seen += rank_seen
    assert sorted(seen) == list(range(30))
    # The epoch order is a permutation, cut into disjoint shards.
    orders = [
        DataStream(
            [StreamRecords("vqa", 1.0, records)], p, seq_len=64, batch_size=1, seed=7, rank=r, world_size=3
        )
        for r in range(3)
    ]
    for epoch in (0, 1):
        shards = [o.shard_order("vqa", epoch) for o in orders]
        assert sorted(i for s in shards for i in s) == list(range(30))


def test_data_state_resumes_exactly(tiny, tmp_path):
    _, p = tiny
    cfg = config_from_dict(
        tiny_config(
            tmp_path, data={"streams": [{"source": "pydoc"}, {"source": "easy_vqa_vqa", "weight": 0.5}]}
        )
    )
    cfg.data.max_records = 60
    train, _ = build_data(cfg.data, p, batch_size=3, seed=1)
    for _ in range(7):
        train.next_batch()
    state = json.loads(json.dumps(train.state_dict()))
    expected = [train.next_batch() for _ in range(5)]
    again, _ = build_data(cfg.data, p, batch_size=3, seed=1)
    again.load_state_dict(state)
    assert all(batches_equal(x, y) for x, y in zip(expected, [again.next_batch() for _ in range(5)]))
    other_world, _ = build_data(cfg.data, p, batch_size=3, seed=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        other_world.load_state_dict(state)


def test_vqa_sample_layout_and_truncation(tiny):
    from metalm.data.builtin import load_builtin

    _, p = tiny
    rec = load_builtin("easy_vqa_vqa", "validation")[0]
    data = DataStream([StreamRecords("vqa", 1.0, [rec])], p, seq_len=64, batch_size=1)
    sample, _, _ = data.next_sample()
    kinds = [(type(s).__name__, getattr(s, "encoder", None), s.loss) for s in sample]
    assert kinds == [
        ("TextSegment", None, False),  # BOS
        ("EncodedSegment", "vision", True),
        ("EncodedSegment", "text", False),  # Enc("question: ...")
        ("TextSegment", None, False),  # "answer:"
        ("TextSegment", None, True),  # the answer + EOS
    ]
    assert p.decode(sample[2].target_ids).startswith("question")
    assert p.decode(sample[-1].ids) == rec.answers[0]
    # Truncation keeps whole encoded segments and cuts text.
    assert len(sample[2].input_ids) > 2
    assert truncate_sample(sample, 1 + 5 + 2, p.config) == sample[:2]
    cut = truncate_sample(
        sample, sum(len(s.ids) if isinstance(s, TextSegment) else 0 for s in sample) + 20, p.config
    )
    assert cut == sample
    short = DataStream([StreamRecords("vqa", 1.0, [rec])], p, seq_len=9, batch_size=1)
    with pytest.raises(ValueError, match="nothing to train on"):
        short.next_sample()


def test_bad_records_raise_or_are_counted(tiny, tmp_path):
    _, p = tiny
    good = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        {"kind": "image_text", "image": "ok.png", "text": "a red square."},
        {"kind": "image_text", "image": "broken.png", "text": "broken."},
        {"kind": "text", "text": ""},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = config_from_dict(tiny_config(tmp_path / "out", data={"streams": [{"source": str(path)}]}))
    with pytest.raises(RecordError, match=r"d.jsonl:3: field 'text'"):
        build_data(cfg.data, p, batch_size=2, seed=0)
    cfg.data.skip_bad = True
    train, val = build_data(cfg.data, p, batch_size=2, seed=0)
    assert val is None
    for _ in range(3):
        train.next_batch()
    assert train.report.count == 2  # the empty text (at load) + the undecodable image (at first use)
    assert "broken.png" in str(train.report.items)
    # The undecodable image names the file and line it came from, then its place in the stream.
    image = next(item for item in train.report.items if item[2] == "image")
    assert image[0] == str(path) and image[1] == 2 and image[3].endswith("(stream 'd', record 1)")
    assert all(name == "d" for name, _ in train.last_sources)
    assert isinstance(train.streams[0].records[0], ImageText)


def test_a_model_without_vision_encoder_names_each_image_stream_once(caplog):
    """The GPT baseline leaves images out: one warning per stream that has images, none for text streams,
    and none repeated by the validation data."""
    from metalm import ModelRecipe
    from metalm.training.config import DataConfig, StreamConfig
    from metalm.training.data import build_data
    from tests.conftest import TINY_LLAMA

    _, processor = ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6").build()
    data = DataConfig(
        streams=[
            StreamConfig(source="pydoc", name="docs"),
            StreamConfig(source="easy_vqa_captions", name="captions"),
            StreamConfig(source="easy_vqa_vqa", name="vqa"),
        ],
        seq_len=64,
        max_records=20,
    )
    with caplog.at_level("WARNING", logger="metalm.training"):
        train, val = build_data(data, processor, batch_size=4, seed=0)
        train.take(12)
        val.take(6)
    said = [r.getMessage() for r in caplog.records if "no vision encoder" in r.getMessage()]
    assert sorted(said) == sorted(
        f"the model has no vision encoder: images in stream {name!r} are left out (text-only baseline)"
        for name in ("captions", "vqa")
    )


def test_text_windows_open_with_bos_and_fill_seq_len(tiny):
    from metalm.data.segments import sample_length
    from metalm.training.config import DataConfig, StreamConfig
    from metalm.training.data import build_data

    model, processor = tiny
    data = DataConfig(streams=[StreamConfig(source="pydoc", name="docs")], seq_len=48, max_records=5)
    train, _ = build_data(data, processor, batch_size=2, seed=0)
    for _ in range(4):
        sample, _ = train.streams[0].next_sample()
        assert sample[0].ids == [processor.bos_token_id] and sample[0].loss is False
        assert sample_length(sample, model.config) == 48

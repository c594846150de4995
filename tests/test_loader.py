"""The input pipeline: the plan of the global sequence, rank-local building, DataLoader workers (same
batches as without them, exact resume, bad records counted in the training process)."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from metalm.training.config import config_from_dict
from metalm.training.data import build_data
from metalm.training.loader import BatchLoader
from metalm.training.stream import Stream
from tests.training_helpers import batches_equal, tiny_config


def three_streams(tmp_path, **data) -> object:
    cfg = tiny_config(tmp_path)
    cfg["data"]["streams"].append({"name": "vqa", "source": "easy_vqa_vqa", "weight": 1.0})
    cfg["data"].update(data)
    return config_from_dict(cfg).data


def take(loader: BatchLoader, n: int) -> list:
    try:
        return [loader.next() for _ in range(n)]
    finally:
        loader.close()


def assert_same(a: list, b: list) -> None:
    assert [x.sources for x in a] == [y.sources for y in b]
    assert all(batches_equal(x.inputs, y.inputs) for x, y in zip(a, b))


@pytest.mark.parametrize("mix", ["sample", "batch"])
def test_workers_give_the_batches_of_the_training_process(tiny, tmp_path, mix):
    _, p = tiny
    data = three_streams(tmp_path, mix=mix)
    inline, _ = build_data(data, p, batch_size=3, seed=0)
    workers, _ = build_data(data, p, batch_size=3, seed=0)
    expected = take(BatchLoader(inline, num_workers=0), 7)
    assert_same(expected, take(BatchLoader(workers, num_workers=2), 7))
    # The training process's stream is where the consumed batches end (not where prefetching got to).
    assert workers.state_dict() == inline.state_dict()
    assert workers.last_sources == inline.last_sources


def test_workers_resume_mid_epoch_exactly(tiny, tmp_path):
    _, p = tiny
    data = three_streams(tmp_path)
    first, _ = build_data(data, p, batch_size=2, seed=1)
    take(BatchLoader(first, num_workers=2), 5)
    state = json.loads(json.dumps(first.state_dict()))
    expected = take(BatchLoader(first, num_workers=0), 6)
    for workers in (0, 2):
        again, _ = build_data(data, p, batch_size=2, seed=1)
        again.load_state_dict(state)
        assert_same(expected, take(BatchLoader(again, num_workers=workers), 6))


def test_each_rank_builds_only_its_rows(tiny, tmp_path, monkeypatch):
    _, p = tiny
    data = three_streams(tmp_path)
    built = []
    real = Stream.build

    def counted(self, row):
        built.append(row)
        return real(self, row)

    monkeypatch.setattr(Stream, "build", counted)
    one, _ = build_data(data, p, batch_size=4, seed=0)
    ranks = [build_data(data, p, batch_size=2, seed=0, rank=r, world_size=2)[0] for r in range(2)]
    for _ in range(5):
        built.clear()
        one.next_batch()
        whole = list(built)
        got = []
        for rank in ranks:
            built.clear()
            rank.next_batch()
            assert len(built) == 2  # this rank's rows, not the other rank's
            got += built
        assert got == whole


def stream_sized(tmp_path, sizes: dict[str, int]):
    """three_streams with `mix: batch` and the named streams given rows per micro-batch of their own."""
    data = three_streams(tmp_path, mix="batch")
    for stream in data.streams:
        stream.batch_size = sizes.get(stream.name)
    return data


def test_a_stream_with_a_batch_size_of_its_own(tiny, tmp_path):
    _, p = tiny
    data = stream_sized(tmp_path, {"vqa": 1, "docs": 5})
    inline, _ = build_data(data, p, batch_size=3, seed=0)
    expected = take(BatchLoader(inline, num_workers=0), 12)
    rows = {"vqa": 1, "docs": 5, "captions": 3}
    for batch in expected:
        (stream,) = {name for name, _ in batch.sources}
        assert len(batch.sources) == rows[stream] == batch.inputs["input_ids"].shape[0]
    assert {name for b in expected for name, _ in b.sources} == set(rows)  # every stream drawn
    workers, _ = build_data(data, p, batch_size=3, seed=0)
    assert_same(expected, take(BatchLoader(workers, num_workers=2), 12))
    # 2 processes x the per-process sizes build, between them, the batches of 1 process x twice the sizes.
    one, _ = build_data(stream_sized(tmp_path, {"vqa": 2, "docs": 10}), p, batch_size=6, seed=0)
    ranks = [build_data(data, p, batch_size=3, seed=0, rank=r, world_size=2)[0] for r in range(2)]
    for _ in range(8):
        one.next_batch()
        parts = []
        for rank in ranks:
            rank.next_batch()
            parts += rank.last_sources
        assert parts == one.last_sources


def test_a_stream_batch_size_change_is_refused_on_exact_resume(tiny, tmp_path):
    _, p = tiny
    first, _ = build_data(stream_sized(tmp_path, {"vqa": 1}), p, batch_size=3, seed=0)
    first.take(4)
    state = json.loads(json.dumps(first.state_dict()))
    again, _ = build_data(stream_sized(tmp_path, {"vqa": 2}), p, batch_size=3, seed=0)
    with pytest.raises(ValueError, match="batch sizes"):
        again.load_state_dict(state)
    again.load_state_dict(state, strict=False)  # the sample sequence goes on, cut differently
    same, _ = build_data(stream_sized(tmp_path, {"vqa": 1}), p, batch_size=3, seed=0)
    same.load_state_dict(state)
    first.next_batch()
    same.next_batch()
    assert same.last_sources == first.last_sources


def test_a_stream_batch_size_needs_batch_mix(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"]["streams"][1]["batch_size"] = 2
    with pytest.raises(ValueError, match=r"data\.streams\[1\]\.batch_size.*mix: batch"):
        config_from_dict(cfg)
    cfg["data"]["mix"] = "batch"
    assert config_from_dict(cfg).data.stream_batch_sizes() == {"captions": 2}


def broken_image_stream(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [{"kind": "image_text", "image": "ok.png", "text": f"a red square {i}."} for i in range(5)]
    lines.insert(2, {"kind": "image_text", "image": "broken.png", "text": "broken."})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = tiny_config(
        tmp_path / "out", data={"streams": [{"name": "d", "source": str(path)}], "skip_bad": True}
    )
    return config_from_dict(cfg).data


def test_bad_records_from_workers_are_counted_and_logged_once(tiny, tmp_path, caplog):
    _, p = tiny
    data = broken_image_stream(tmp_path)
    inline, _ = build_data(data, p, batch_size=2, seed=0)
    expected = take(BatchLoader(inline, num_workers=0), 8)
    workers, _ = build_data(data, p, batch_size=2, seed=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metalm"):
        got = take(BatchLoader(workers, num_workers=2), 8)
    assert_same(expected, got)
    # Both workers met the broken image (each builds its own batches): reported once.
    assert workers.report.count == inline.report.count == 1
    assert "broken.png" in str(workers.report.items)
    said = [r.getMessage() for r in caplog.records if "skipping bad record" in r.getMessage()]
    assert len(said) == 1 and "broken.png" in said[0]
    assert workers.state_dict() == inline.state_dict()


def test_a_bad_record_is_replaced_without_moving_other_rows(tiny, tmp_path):
    _, p = tiny
    data = broken_image_stream(tmp_path)
    stream, _ = build_data(data, p, batch_size=1, seed=0)
    planned = [stream.plan.next_row() for _ in range(18)]  # three epochs of the 6 records
    stream, _ = build_data(data, p, batch_size=1, seed=0)
    got = [stream.next_sample()[2] for _ in range(18)]
    broken = 2
    for row, sources in zip(planned, got):
        assert sources == [row.record] if row.record != broken else sources != [broken]
    assert stream.report.count == 1

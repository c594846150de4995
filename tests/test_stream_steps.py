"""``data.streams[].steps: [start, end]``: a stream drawn only in those optimizer steps (a curriculum), the
same batches with and without loader state in between; validation draws every stream."""

from __future__ import annotations

import json

import pytest

from metalm.training.config import ConfigError, config_from_dict
from metalm.training.data import DataStream, StreamRecords, build_data
from tests.training_helpers import text_records, tiny_config


def two_phases(processor, mix: str, grad_accum: int = 2, split: str = "train") -> DataStream:
    streams = [
        StreamRecords("early", 1.0, text_records(30, 1)),
        StreamRecords("late", 1.0, text_records(30, 2)),
    ]
    return DataStream(
        streams, processor, seq_len=8, batch_size=3, seed=0, mix=mix, split=split,
        steps=[(0, 3), (3, None)], grad_accum=grad_accum,
    )  # fmt: skip


def streams_of_batches(data: DataStream, n: int) -> list[set[str]]:
    out = []
    for _ in range(n):
        data.next_batch()
        out.append({name for name, _ in data.last_sources})
    return out


@pytest.mark.parametrize("mix", ["sample", "batch"])
def test_a_stream_is_drawn_only_in_its_steps(gpt_processor, mix):
    # grad_accum 2: steps 0-2 are micro-batches 0-5.
    seen = streams_of_batches(two_phases(gpt_processor, mix), 12)
    assert seen[:6] == [{"early"}] * 6 and seen[6:] == [{"late"}] * 6


def test_a_stream_outside_its_steps_changes_no_other_draw(gpt_processor):
    a, b = StreamRecords("a", 1.0, text_records(30, 1)), StreamRecords("b", 2.0, text_records(30, 2))
    late = StreamRecords("late", 5.0, text_records(30, 3))
    common = dict(seq_len=8, batch_size=3, seed=0, mix="batch")
    without = DataStream([a, b], gpt_processor, **common)
    with_late = DataStream([a, late, b], gpt_processor, steps=[None, (10, 100), None], **common)
    before = streams_of_batches(without, 10)
    assert before == streams_of_batches(with_late, 10) and len({s for x in before for s in x}) == 2
    assert "late" in {s for x in streams_of_batches(with_late, 8) for s in x}


def test_a_resumed_stream_keeps_its_phase(gpt_processor):
    first = two_phases(gpt_processor, "batch")
    streams_of_batches(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    again = two_phases(gpt_processor, "batch")
    again.load_state_dict(state)
    assert streams_of_batches(again, 4) == streams_of_batches(first, 4) == [{"early"}] * 2 + [{"late"}] * 2


def test_validation_draws_every_stream(tiny, tmp_path):
    _, processor = tiny
    cfg = tiny_config(tmp_path)
    cfg["data"]["streams"][0]["steps"] = [0, 1]
    cfg["data"]["streams"][1]["steps"] = [1, 1000]
    train, val = build_data(config_from_dict(cfg).data, processor, batch_size=2, seed=0, grad_accum=2)
    assert streams_of_batches(train, 4) == [{"docs"}] * 2 + [{"captions"}] * 2
    assert {s for batch in streams_of_batches(val, 12) for s in batch} == {"docs", "captions"}


def test_steps_that_leave_a_step_without_a_stream_are_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"]["streams"][0]["steps"] = [0, 2]
    cfg["data"]["streams"][1]["steps"] = [3, 10]
    with pytest.raises(ConfigError, match="no stream is drawn in step 2"):
        config_from_dict(cfg)
    cfg["data"]["streams"][1]["steps"] = [2, 4]  # max_steps is 6
    with pytest.raises(ConfigError, match="no stream is drawn in step 4"):
        config_from_dict(cfg)
    cfg["data"]["streams"][1]["steps"] = [4, 4]
    with pytest.raises(ConfigError, match="start < end"):
        config_from_dict(cfg)
    cfg["data"]["streams"][1]["steps"] = [2, None]  # to the end of the run
    assert config_from_dict(cfg).data.streams[1].steps == (2, None)
    cfg["data"]["streams"][1].pop("steps")  # a stream without steps covers every step
    config_from_dict(cfg)

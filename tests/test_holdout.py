"""One file, two splits (issue #23 item 7: `validation_fraction`), and where relative paths resolve (item 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from metalm.data.records import ImageText, TextDocument, VQAExample
from metalm.training.config import ConfigError, DataConfig, StreamConfig, load_config
from metalm.training.data import load_stream_records
from metalm.training.holdout import split_holdout
from tests.conftest import TINY_MODEL


def _vqa(n_images: int, per_image: int = 3) -> list[VQAExample]:
    return [
        VQAExample(f"/data/{i}.png", f"question {q}?", ("yes",), id=f"{i}-{q}")
        for i in range(n_images)
        for q in range(per_image)
    ]


def test_no_image_is_in_both_parts_and_the_split_is_seeded():
    records = _vqa(40)
    train, held = split_holdout(records, 0.1, seed=0)
    assert len(held) == 4 * 3 and len(train) + len(held) == len(records)
    assert not {r.image for r in train} & {r.image for r in held}
    assert split_holdout(list(reversed(records)), 0.1, seed=0)[1] == list(reversed(held))  # order-free
    assert {r.image for r in split_holdout(records, 0.1, seed=1)[1]} != {r.image for r in held}


def test_records_without_images_split_by_id_or_content():
    docs = [TextDocument(f"text {i}") for i in range(20)] + [
        ImageText("/a.png", "x"),
        ImageText("/a.png", "y"),
    ]
    train, held = split_holdout(docs, 0.25)
    assert len(held) in (5, 6) and (
        {"x", "y"} <= {r.text for r in held} or {"x", "y"} <= {r.text for r in train}
    )
    with pytest.raises(ValueError, match="two distinct"):
        split_holdout([ImageText("/a.png", "x"), ImageText("/a.png", "y")], 0.5)


def _vqa_file(tmp_path: Path) -> Path:
    rows = []
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(tmp_path / f"{i}.png")
        rows += [{"kind": "vqa", "image": f"{i}.png", "question": f"q{q}?", "answer": "a"} for q in range(2)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_stream_holds_out_a_fraction_of_its_file(tmp_path):
    path = _vqa_file(tmp_path)
    stream = StreamConfig(source=str(path), validation_fraction=0.2, validation_seed=3)
    data = DataConfig(streams=[stream], seq_len=64)
    train = load_stream_records(stream, data, "train").records
    val = load_stream_records(stream, data, "validation").records
    assert len(val) == 4 * 2 and len(train) == 16 * 2
    assert not {r.image for r in train} & {r.image for r in val}


def test_validation_fraction_and_source_exclude_each_other(tmp_path):
    path = _vqa_file(tmp_path)
    with pytest.raises(ValueError, match="validation_source or validation_fraction, not both"):
        StreamConfig(source=str(path), validation_source=str(path), validation_fraction=0.1)
    with pytest.raises(ValueError, match="less than 1"):
        StreamConfig(source=str(path), validation_fraction=1.0)


def test_a_missing_relative_source_says_how_it_resolved(tmp_path, monkeypatch):
    """`extends` is relative to the config file, `source` to the current directory: the error says so and
    points at the file next to the config when that is what was meant."""
    folder = tmp_path / "project"
    folder.mkdir()
    _vqa_file(folder)
    config = folder / "mine.yaml"
    config.write_text(
        json.dumps({"model": TINY_MODEL, "data": {"streams": [{"source": "mine.jsonl"}]}}), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(Path("project") / "mine.yaml")
    message = str(err.value)
    assert "resolved against the current directory" in message and os.getcwd() in message
    assert "'mine.jsonl' exists next to the config file: write 'project/mine.jsonl'" in message
    assert load_config(config, ["data.streams.0.source=project/mine.jsonl"]).data.streams[0].source

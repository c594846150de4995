"""scripts/own_data_icl.py: the generated data set is valid records with images beside them, and the page
reads its figures from the results."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from metalm.data.record_io import read_records
from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("own_data_icl")


def test_the_data_set_is_three_typed_questions_an_image(script, tmp_path):
    script.make_dataset(tmp_path, sizes=(("train", 6), ("test", 3)))
    lines = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and [r["meta"]["type"] for r in lines[:3]] == ["count", "size", "side"]
    assert all(Image.open(tmp_path / r["image"]).size == (64, 64) for r in lines)
    assert {r["answers"][0] for r in lines if r["meta"]["type"] == "side"} <= {"left", "right"}
    assert (
        len(list(read_records(tmp_path / "train.jsonl", check_images=True))) == 18
    )  # the records parse as the trainer reads them


def _by_k(all_: float, scores: dict[str, float]) -> dict:
    groups = {g: {"n": 3, "score": v, "majority": "two", "majority_score": 40.0} for g, v in scores.items()}
    return {"mean": {"vqa_accuracy": all_}, "groups": groups}


def test_the_page_reads_its_figures_from_the_results(script):
    results = {
        "one question a row": {
            "by_k": {"0": _by_k(80.0, {"count": 80.0}), "4": _by_k(60.0, {"count": 60.0})},
            "similar": {"4": _by_k(70.0, {"count": 70.0}), "vote": {"count": 90.0}},
        },
        "+ in-context rows": {
            "by_k": {"0": _by_k(78.0, {"count": 78.0}), "4": _by_k(77.0, {"count": 77.0})},
            "similar": {"4": _by_k(85.0, {"count": 85.0}), "vote": {"count": 95.0}},
        },
    }
    args = type("Args", (), {"init_from": "runs/quickstart/final", "steps": 200, "lr": 1e-3})()
    page = script.page_markdown(results, "python scripts/own_data_icl.py", args)
    assert (
        "| one question a row | 4 | 60.0 | 60.0 |" in page
        and "| + in-context rows | 0 | 78.0 | 78.0 |" in page
    )
    assert (
        "20.0 points worse with four demonstrations" in page and "rows, 1.0 points worse (its worst" in page
    )
    assert "2.0 points lower at k = 0 than with one question a row" in page and "40.0 (`two`)" in page
    assert "| + in-context rows | 4, retrieved | 85.0 | 85.0 |" in page
    assert "| vote of the 4 retrieved records (+ in-context rows) | | | 95.0 |" in page
    assert "answers 85.0 in all against 78.0 with none" in page and "count 85.0 / 78.0 (vote 95.0)" in page

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


def test_the_page_reads_its_figures_from_the_results(script, tmp_path):
    results = {
        "one question a row": {
            "config": {"optim": {"max_steps": 200}},
            "by_k": {"0": _by_k(80.0, {"count": 80.0}), "4": _by_k(60.0, {"count": 60.0})},
            "similar": {"4": _by_k(70.0, {"count": 70.0}), "vote": {"count": 90.0}},
        },
        "+ in-context rows": {
            "by_k": {"0": _by_k(78.0, {"count": 78.0}), "4": _by_k(77.0, {"count": 77.0})},
            "similar": {"4": _by_k(85.0, {"count": 85.0}), "vote": {"count": 95.0}},
        },
        "one question a row, slot positions": {
            "by_k": {"0": _by_k(45.0, {"count": 45.0}), "4": _by_k(44.0, {"count": 44.0})},
            "similar": {"4": _by_k(70.0, {"count": 70.0}), "vote": {"count": 90.0}},
        },
        "+ in-context rows, slot positions": {
            "by_k": {"0": _by_k(88.0, {"count": 88.0}), "4": _by_k(87.0, {"count": 87.0})},
            "similar": {"4": _by_k(85.0, {"count": 85.0}), "vote": {"count": 95.0}},
        },
    }
    (tmp_path / "probe.json").write_text(json.dumps({"count": 99.0}))  # what the slots hold, cached
    args = type(
        "Args", (), {"init_from": "runs/quickstart/final", "steps": 200, "lr": 1e-3, "out": tmp_path}
    )()
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
    assert "| linear probe of `runs/quickstart/final`'s frozen image slots (no decoder) | | | 99.0 |" in page
    assert (
        "without → with, one question a row and with in-context rows: count 80.0 → 45.0 and 78.0 → 88.0."
        in page
    )
    assert "stays within 10 points of its majority" not in page  # count is read (78-88 against 40)


def test_the_page_names_a_type_no_variant_reads(script, tmp_path):
    def variant(score: float) -> dict:
        scores = {"count": 80.0, "side": score}
        return {"by_k": {"0": _by_k(80.0, scores), "4": _by_k(80.0, scores)},
                "similar": {"4": _by_k(80.0, scores), "vote": {"count": 90.0, "side": 60.0}}}  # fmt: skip

    results = {name: variant(45.0 + i) for i, name in enumerate(script.VARIANTS)}
    (tmp_path / "probe.json").write_text(json.dumps({"count": 99.0, "side": 100.0}))
    args = type("Args", (), {"init_from": "m", "steps": 200, "lr": 1e-3, "out": tmp_path})()
    for r in results.values():
        r["config"] = {"optim": {"max_steps": 200}}
    longer = {
        "+ in-context rows, 800 steps": {
            "config": {"optim": {"max_steps": 800}},
            "by_k": {
                "0": _by_k(90.0, {"count": 95.0, "side": 65.0}),
                "4": _by_k(87.0, {"count": 94.0, "side": 60.0}),
            },
            "similar": {
                "4": _by_k(91.0, {"count": 96.0, "side": 66.0}),
                "vote": {"count": 97.0, "side": 61.0},
            },
        },
        "one question a row, 2400 steps": {
            "config": {"optim": {"max_steps": 2400}},
            "by_k": {
                "0": _by_k(97.0, {"count": 96.0, "side": 98.0}),
                "4": _by_k(60.0, {"count": 70.0, "side": 50.0}),
            },
            "similar": {
                "4": _by_k(70.0, {"count": 80.0, "side": 60.0}),
                "vote": {"count": 97.0, "side": 61.0},
            },
        },
    }
    page = script.page_markdown(results, "python scripts/own_data_icl.py", args, longer)
    assert "The `side` question stays within 10 points of its majority answer in every variant of 200" in page
    assert "(the probe row: 100.0)" in page and "The `count` question" not in page
    assert "| + in-context rows, 800 steps | 0 | 90.0 | 95.0 | 65.0 |" in page
    assert "| + in-context rows, 800 steps | 4, retrieved | 91.0 | 96.0 | 66.0 |" in page
    assert "| vote of the 4 retrieved records (+ in-context rows, 800 steps) | | | 97.0 | 61.0 |" in page
    # compared with its own 200-step variant (+ in-context rows: side 46.0), and k = 0 -> 4
    assert "+ in-context rows for 800 steps instead of 200: at k = 0" in page
    assert "count 95.0 (+15.0; probe 99.0), side 65.0 (+19.0; probe 100.0)" in page
    assert "3.0 points worse in all than with none (count 95.0 → 94.0, side 65.0 → 60.0)" in page
    # each layout's k = 0 -> 4 by its steps, and the type the longest plain run loses most against its majority
    assert (
        "one question a row 80.0 → 80.0 at 200 steps, 97.0 → 60.0 at 2400 steps; with in-context rows "
        "80.0 → 80.0 at 200 steps, 90.0 → 87.0 at 800 steps." in page
    )
    assert (
        "the `side` question falls from 98.0 to 50.0 with demonstrations (always answering `two`: 40.0)"
        in page
    )

"""scripts/demonstration_controls.py: the same k-shot easy-VQA evaluation under demonstrations that change one
thing at a time."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("demonstration_controls")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_controls_change_one_thing_and_the_tables_follow_their_evaluations(script, tiny_saved, tmp_path):
    test, controls = script.prepare(tmp_path / "data")
    assert list(controls) == list(script.CONTROLS)
    grouped = _records(test)
    assert {r["meta"]["type"] for r in grouped} == set(script.GROUPS)
    drawn, removed = _records(controls["as drawn"]), _records(controls["shapes removed"])
    # The same demonstrations, in the same order, only their images plain: one colour, the background's.
    assert [(r["question"], r["answers"]) for r in drawn] == [(r["question"], r["answers"]) for r in removed]
    with (
        Image.open(tmp_path / "data" / removed[0]["image"]) as blank,
        Image.open(tmp_path / "data" / drawn[0]["image"]) as image,
    ):
        assert blank.size == image.size and len(blank.getcolors()) == 1
        assert blank.getpixel((0, 0)) == image.convert("RGB").getpixel((0, 0))
    kinds = {c: {r["answers"][0] in ("yes", "no") for r in _records(p)} for c, p in controls.items()}
    assert kinds["open questions only"] == {False} and kinds["yes/no questions only"] == {True}

    model, processor = script.load_model(tiny_saved)
    outs = {c: script.evaluate(model, processor, test, p, tmp_path / c.replace(" ", "-").replace("/", ""), 1, 1)
            for c, p in controls.items()}  # fmt: skip
    lines = script.table(tiny_saved, outs, test.stem, 1)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| demonstrations")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(script.CONTROLS)
    shown = _records(next((tmp_path / "shapes-removed").glob("predictions-*-k1-s0.jsonl")))
    assert all(r["prompt"].startswith("<image:blank-") for r in shown)  # the demonstration's image
    written = (outs["as drawn"] / "summary.json").stat().st_mtime_ns
    script.evaluate(model, processor, test, controls["as drawn"], outs["as drawn"], 1, 1)  # done: reused
    assert (outs["as drawn"] / "summary.json").stat().st_mtime_ns == written
    script.evaluate(
        model, processor, test, controls["as drawn"], outs["as drawn"], 2, 1
    )  # asked otherwise: again
    assert sorted(p.name for p in outs["as drawn"].glob("predictions-*.jsonl")) == [
        "predictions-test-grouped-k0-s0.jsonl", *(f"predictions-test-grouped-k2-s{s}.jsonl" for s in (0, 1, 2))
    ]  # fmt: skip

"""Evaluating one's own data (issue #23 items 5, 6 and 8): a JSONL of records evaluated in the model's trained
layout, scores per group with the group's majority baseline, and how scores are printed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from metalm.evaluation.runner import _results_markdown
from metalm.evaluation.tasks import Example, Task, TaskError


def _summary(seeds: dict[str, dict[str, float]], metric: str = "vqa_accuracy") -> dict:
    key = {"vqa_accuracy": "vqa_accuracy", "caption": "CIDEr"}[metric]
    values = [m[key] for m in seeds.values()]
    mean = sum(values) / len(values)
    return {
        "model": "m", "mode": "metalm", "seeds": [int(s) for s in seeds], "limit": None,
        "protocols": {"t": {"metric": metric}},
        "results": {"t": {"1": {"seeds": seeds, "mean": {key: mean}, "std": {key: 0.0 if len(values) == 1 else 1.5}, "n": 3}}},
    }  # fmt: skip


def test_one_seed_prints_no_spread():
    table = _results_markdown(_summary({"0": {"vqa_accuracy": 88.3}}))
    assert "| t | vqa_accuracy | 88.3 |" in table and "± 0.0" not in table
    several = _results_markdown(_summary({"0": {"vqa_accuracy": 88.3}, "1": {"vqa_accuracy": 90.0}}))
    assert "89.2 ± 1.5" in several


def test_cider_is_said_not_to_be_on_a_0_100_scale():
    table = _results_markdown(_summary({"0": {"CIDEr": 750.0}}, metric="caption"))
    assert "| t | CIDEr | 750.0 |" in table
    assert "CIDEr-D: 0-1000" in table and "0-100 scale" not in table


# ------------------------------------------------------------------------------ items 5 and 6: --data
def _records_file(tmp_path: Path) -> Path:
    """Six VQA records of two question types and two captions, with images beside the file."""
    rows = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("red", "triangle")]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        rows.append({"kind": "vqa", "image": f"{i}.png", "question": "what color is the shape?", "answers": [colour], "meta": {"type": "colour"}})  # fmt: skip
        rows.append({"kind": "vqa", "image": f"{i}.png", "question": "what shape is it?", "answer": shape, "meta": {"type": "shape"}})  # fmt: skip
    rows += [
        {"kind": "image_text", "image": f"{i}.png", "text": "a shape on a plain background."} for i in (0, 1)
    ]
    path = tmp_path / "my-vqa-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_data_uses_the_models_trained_layout_and_groups(tiny_saved, tmp_path, capsys):
    """`metalm eval MODEL --data FILE`: no task file; VQA in the saved `vqa` layout, captions in the saved
    `caption` layout, and a per-type table beside each type's majority answer."""
    from metalm.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_saved, model)
    config = json.loads((model / "config.json").read_text())
    config["prompt_layouts"] = {"vqa": {"template": "Q: {question}", "prompt": "A:"}}
    (model / "config.json").write_text(json.dumps(config))
    data, out = _records_file(tmp_path), tmp_path / "out"
    assert main(["eval", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    vqa = summary["protocols"]["my-vqa-test-vqa"]
    assert (vqa["input_template"], vqa["decoder_prompt"], vqa["metric"]) == (
        "Q: {question}",
        "A:",
        "vqa_accuracy",
    )
    caption = summary["protocols"]["my-vqa-test-image_text"]
    assert (caption["input_template"], caption["metric"]) == ("", "caption")  # the default caption layout
    groups = summary["results"]["my-vqa-test-vqa"]["0"]["groups"]
    assert {g: (v["n"], v["majority"]) for g, v in groups.items()} == {
        "colour": (3, "red"),
        "shape": (3, "circle"),
    }
    assert (
        round(groups["colour"]["majority_score"], 1) == 66.7
        and round(groups["shape"]["majority_score"], 1) == 33.3
    )
    rows = [json.loads(x) for x in (out / "predictions-my-vqa-test-vqa-k0-s0.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rows] == ["colour", "shape"] * 3 and "A:" in rows[0]["prompt"]
    printed = capsys.readouterr().out
    assert "by group" in printed and "| colour | 3 |" in printed and "| red | 66.7 |" in printed


def test_group_by_names_another_meta_key(tmp_path):
    from metalm.evaluation.own_data import read_own_data

    data = _records_file(tmp_path)
    assert {ex.group for ex in read_own_data(data)["vqa"]} == {"colour", "shape"}
    assert {ex.group for ex in read_own_data(data, group_by="source")["vqa"]} == {None}


def test_group_scores_average_over_seeds_and_skip_corpus_metrics():
    from metalm.evaluation.own_data import group_scores

    task = Task(
        name="t", load=lambda s: [], input_template="{question}", scoring="generate", metric="vqa_accuracy"
    )
    examples = [Example(str(i), {"question": "q"}, (a,), group=g) for i, (a, g) in enumerate([("yes", "y/n"), ("yes", "y/n"), ("no", "y/n"), ("red", "colour")])]  # fmt: skip
    seeds = {0: [{"score": s} for s in (1.0, 0.0, 1.0, 1.0)], 1: [{"score": s} for s in (1.0, 1.0, 1.0, 0.0)]}
    groups = group_scores(task, examples, seeds)
    assert groups["y/n"]["score"] == pytest.approx((200 / 3 + 100) / 2) and groups["y/n"]["majority"] == "yes"
    assert groups["y/n"]["majority_score"] == pytest.approx(200 / 3) and groups["colour"]["n"] == 1
    assert group_scores(task, examples, {0: [{"score": None}] * 4}) == {}  # CIDEr: no per-example score


def test_eval_needs_a_task_or_data(tiny_saved):
    from metalm.evaluation.eval_cli import eval_main

    with pytest.raises(TaskError, match="give --task and/or --data"):
        eval_main(str(tiny_saved), [])


def test_demonstrations_may_come_from_another_records_file(tiny_saved, tmp_path):
    """`--demo-data TRAIN.jsonl`: every demonstration is a record of that file (randomly drawn or retrieved),
    none of the evaluated file; a kind it lacks is an error naming it; it needs --data."""
    from metalm.evaluation.eval_cli import eval_main

    test = _records_file(tmp_path)
    rows = []
    for i, colour in enumerate(("green", "black")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"train-{i}.png")
        rows.append({"kind": "vqa", "image": f"train-{i}.png", "question": "what color is the shape?", "answer": colour})  # fmt: skip
        rows.append({"kind": "image_text", "image": f"train-{i}.png", "text": f"a {colour} hexagon."})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for demos in ("random", "similar"):
        out = tmp_path / f"out-{demos}"
        eval_main(str(tiny_saved), [], shots="2", data=[str(test)], demo_data=str(train), out=str(out),
                  device="cpu", demos=demos)  # fmt: skip
        for task, shown in (
            ("vqa", {"green", "black"}),
            ("image_text", {"a green hexagon.", "a black hexagon."}),
        ):
            lines = (out / f"predictions-my-vqa-test-{task}-k2-s0.jsonl").read_text().splitlines()
            assert all(set(json.loads(x)["demonstration_answers"]) == shown for x in lines)
    only_vqa = tmp_path / "only-vqa.jsonl"
    only_vqa.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] == "vqa"))
    with pytest.raises(TaskError, match="only-vqa.jsonl: no image_text records to show as demonstrations"):
        eval_main(
            str(tiny_saved), [], shots="1", data=[str(test)], demo_data=str(only_vqa), out=str(tmp_path / "x")
        )
    with pytest.raises(TaskError, match="give --data too"):
        eval_main(str(tiny_saved), ["easyvqa"], demo_data=str(train), out=str(tmp_path / "y"))

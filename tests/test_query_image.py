"""Demonstrations shown with the query's image (`metalm eval --demos query-image`): the random draw, each
demonstration's own image replaced by the query's, so that a loss that stays is not the model mixing images up."""

from __future__ import annotations

import argparse
import json
import re

from metalm.evaluation.demonstrations import QUERY_IMAGE, with_query_image
from metalm.evaluation.eval_cli import add_eval_parser
from metalm.evaluation.runner import evaluate
from metalm.evaluation.tasks import Example, Task

from .test_evaluation import _image_file, _one_thread  # noqa: F401 (autouse: one thread)

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "gray": (128, 128, 128)}


def _task(tmp_path) -> Task:
    examples = [
        Example(
            f"e{i}", {"question": "what color?"}, (name,), image=_image_file(tmp_path, f"{name}.png", rgb)
        )
        for i, (name, rgb) in enumerate(COLOURS.items())
    ]
    return Task(
        "colours", lambda split: examples, "question: {question}", decoder_prompt="answer:",
        scoring="generate", metric="vqa_accuracy", demo_split=None,
    )  # fmt: skip


def test_each_demonstration_keeps_its_question_and_answer_and_shows_the_query_image():
    query = Example("q", {"question": "is it red?"}, ("yes",), image="q.png")
    demos = [Example("a", {"question": "what color?"}, ("blue",), image="a.png"),
             Example("b", {"question": "what shape?"}, ("circle",), image=None)]  # fmt: skip
    shown = with_query_image(demos, query)
    assert [d.image for d in shown] == ["q.png", "q.png"]
    assert [(d.id, d.fields, d.answers) for d in shown] == [(d.id, d.fields, d.answers) for d in demos]
    assert with_query_image(demos, Example("t", {"question": "?"}, ("x",))) == demos  # no image: as drawn


def _rows(folder, k, seed):
    path = folder / f"predictions-colours-k{k}-s{seed}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_random_draw_each_shown_with_the_query_image(tiny, tmp_path):
    model, processor = tiny
    task = _task(tmp_path)
    shown, drawn = tmp_path / "query-image", tmp_path / "random"
    summary = evaluate(model, processor, task, shots=(2,), seeds=(0, 1), progress=False, out_dir=shown,
                       demonstrations="query-image")  # fmt: skip
    evaluate(model, processor, task, shots=(2,), seeds=(0, 1), progress=False, out_dir=drawn)
    assert summary["demonstrations"] == QUERY_IMAGE
    assert set(summary["results"]["colours"]["2"]["seeds"]) == {"0", "1"}  # a draw per seed, as random
    for seed in (0, 1):
        for row, random_row in zip(_rows(shown, 2, seed), _rows(drawn, 2, seed), strict=True):
            query_image = re.findall(r"<image:([^>]+)>", random_row["prompt"])[-1]
            assert re.findall(r"<image:([^>]+)>", row["prompt"]) == [query_image] * 3
            # The same demonstrations as the random draw: only their images differ.
            assert row["demonstration_answers"] == random_row["demonstration_answers"]
            assert re.sub(r"<image:[^>]+>", "", row["prompt"]) == re.sub(
                r"<image:[^>]+>", "", random_row["prompt"]
            )
    results = (shown / "results.md").read_text()
    assert f"- demonstrations: {QUERY_IMAGE}\n" in results  # no "one run per k": it draws per seed


def test_the_cli_takes_it():
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "model", "--task", "easyvqa", "--shots", "4", "--demos", "query-image"])
    assert args.demos == "query-image"

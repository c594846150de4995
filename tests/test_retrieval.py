"""Demonstrations retrieved by similarity (`metalm eval --demos similar`)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from metalm.evaluation.eval_cli import add_eval_parser
from metalm.evaluation.icl import input_parts
from metalm.evaluation.retrieval import SIMILARITY, ExampleIndex, example_vectors
from metalm.evaluation.runner import evaluate
from metalm.evaluation.tasks import Example, Task, TaskError, in_model_layout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread (conftest.py)

TEXTS = ["A match report: the striker scored twice.", "The central bank raised interest rates again.",
         "A new phone with a faster chip.", "The striker scored twice in the match report.",
         "Shares fell as the bank raised rates.", "Parliament debated the budget."]  # fmt: skip
POOL = [Example(f"p{i}", {"text": t}, ("sport" if "striker" in t else "other",)) for i, t in enumerate(TEXTS)]


def _task(pool=POOL) -> Task:
    return Task(
        name="toy",
        load=lambda split: pool,
        input_template="{text} topic:",
        options=("sport", "other"),
        demo_split=None,  # demonstrations from the evaluated split: a query must not be its own
    )


def _index(model, processor, task: Task) -> ExampleIndex:
    def parts_of(ex: Example) -> list:
        return input_parts(task, ex, baseline=False, fewshot=True)

    return ExampleIndex(model, processor, task, parts_of, progress=False)


def test_vectors_are_unit_and_equal_for_equal_inputs(tiny):
    model, processor = tiny
    task = _task()
    twin = Example("twin", dict(POOL[2].fields), ("other",))
    vectors = example_vectors(model, processor, [*POOL, twin], _index(model, processor, task).parts_of,
                              progress=False, batch_size=4)  # fmt: skip
    assert vectors.shape[0] == len(POOL) + 1
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(POOL) + 1))
    torch.testing.assert_close(vectors[2], vectors[-1])  # across batches and padding
    assert float(vectors[0] @ vectors[1]) < 1 - 1e-4


def test_the_most_similar_example_comes_last_and_a_query_is_not_its_own_demonstration(tiny):
    model, processor = tiny
    task = _task()
    index = _index(model, processor, task)
    queries = [POOL[0], Example("q", dict(POOL[4].fields), ("other",))]
    chosen = index.demonstrations(POOL, queries, 3, exclude_self=True)
    assert all(len(demos) == 3 for demos in chosen)
    assert POOL[0] not in chosen[0]  # the query itself is in the pool: excluded
    assert chosen[1][-1] is POOL[4]  # the same text under another id: the most similar, next to the query
    vectors = index._vectors
    for query, demos in zip(queries, chosen):
        q = index.vectors([query], "query")[0]
        sims = [float(vectors[POOL.index(d)] @ q) for d in demos]
        assert sims == sorted(sims)  # least similar first
        others = [float(vectors[i] @ q) for i, p in enumerate(POOL) if p not in demos and p is not query]
        assert max(others) <= min(sims) + 1e-6
    with pytest.raises(TaskError, match="pool holds only"):
        index.demonstrations(POOL, queries, len(POOL), exclude_self=True)


def test_queries_compared_a_chunk_at_a_time_get_the_same_demonstrations(tiny, monkeypatch):
    from metalm.evaluation import retrieval

    model, processor = tiny
    whole = _index(model, processor, _task()).demonstrations(POOL, POOL, 2, exclude_self=True)
    monkeypatch.setattr(retrieval, "QUERY_CHUNK", 4)  # 6 queries: a chunk of 4, then one of 2
    assert _index(model, processor, _task()).demonstrations(POOL, POOL, 2, exclude_self=True) == whole


def test_similar_demonstrations_run_once_per_k_and_say_so(tiny, tmp_path):
    model, processor = tiny
    summary = evaluate(model, processor, _task(), shots=(0, 2), seeds=(0, 1), progress=False,
                       demonstrations="similar", out_dir=tmp_path)  # fmt: skip
    assert summary["demonstrations"] == SIMILARITY
    assert set(summary["results"]["toy"]["2"]["seeds"]) == {"0"}  # retrieval does not depend on the seed
    assert not (tmp_path / "predictions-toy-k2-s1.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "predictions-toy-k2-s0.jsonl").read_text().splitlines()]
    index = _index(model, processor, in_model_layout(_task(), model.config))  # as evaluate() reads it
    expected = index.demonstrations(POOL, POOL, 2, exclude_self=True)
    assert [r["demonstration_answers"] for r in rows] == [[d.answers[0] for d in demos] for demos in expected]
    assert f"- demonstrations: {SIMILARITY}" in (tmp_path / "results.md").read_text()
    random = evaluate(model, processor, _task(), shots=(2,), seeds=(0, 1), progress=False)
    assert random["demonstrations"] is None and set(random["results"]["toy"]["2"]["seeds"]) == {"0", "1"}
    with pytest.raises(TaskError, match="demonstrations must be one of"):
        evaluate(model, processor, _task(), shots=(1,), seeds=(0,), progress=False, demonstrations="nearest")


def test_plain_text_mode_gets_the_same_demonstrations(tiny, tmp_path):
    model, processor = tiny
    answers = {}
    for baseline in (False, True):
        out = tmp_path / str(baseline)
        evaluate(model, processor, _task(), shots=(2,), seeds=(0,), progress=False, baseline=baseline,
                 demonstrations="similar", out_dir=out)  # fmt: skip
        rows = (out / "predictions-toy-k2-s0.jsonl").read_text().splitlines()
        answers[baseline] = [json.loads(line)["demonstration_answers"] for line in rows]
        assert ("[enc:" in json.loads(rows[0])["prompt"]) is not baseline
    assert answers[True] == answers[False]


def test_calibrating_retrieved_demonstrations_warns_that_it_discounts_them(tiny, caplog):
    model, processor = tiny
    with caplog.at_level("WARNING", logger="metalm.evaluation"):
        evaluate(
            model, processor, _task(), shots=(1,), progress=False, demonstrations="similar", calibrate=True
        )
    assert "--calibrate with --demos similar" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="metalm.evaluation"):
        evaluate(model, processor, _task(), shots=(1,), progress=False, demonstrations="similar")
        evaluate(model, processor, _task(), shots=(1,), progress=False, calibrate=True)
    assert "--calibrate with --demos similar" not in caplog.text


def test_eval_parser_takes_demos():
    parser = argparse.ArgumentParser(prog="metalm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["eval", "DIR", "--task", "x", "--demos", "similar"]).demos == "similar"
    assert parser.parse_args(["eval", "DIR", "--task", "x"]).demos == "random"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "DIR", "--task", "x", "--demos", "nearest"])

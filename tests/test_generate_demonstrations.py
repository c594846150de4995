"""`metalm generate --demos FILE`: solved examples before one request, in the k-shot layout evaluation sends."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from metalm.data.processor import InputError
from metalm.evaluation.icl import build_prompt, prompt_to_sample
from metalm.evaluation.tasks import Example, builtin_task, in_model_layout
from metalm.serving.cli import chat as chat_command
from metalm.serving.cli import main
from metalm.serving.demonstrations import attach_demonstrations, choose_demonstrations, read_demonstrations
from metalm.serving.engine import Engine
from metalm.serving.generate_command import generate
from metalm.serving.prompts import PromptBuilder
from metalm.serving.request_types import ChatMessage, Demonstration

from .test_in_context import _flat

COLOURS = {"red": (220, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 220)}


def _image(folder, name: str):
    path = folder / f"{name}.png"
    Image.new("RGB", (32, 32), COLOURS[name]).save(path)
    return path


def _pool(folder) -> list[dict]:
    return [
        {"kind": "vqa", "image": str(_image(folder, c)), "question": "what color is the shape?", "answer": c}
        for c in COLOURS
    ]


def _write(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_a_request_after_demonstrations_is_the_evaluation_prompt(tiny, tmp_path):
    """The parts `metalm generate --demos` sends are, token for token, the k-shot evaluation prompt."""
    model, processor = tiny
    builder = PromptBuilder(processor, model.config)
    demos = read_demonstrations(_write(tmp_path / "demos.jsonl", _pool(tmp_path)))
    query = _image(tmp_path, "green")
    parts = builder.request_parts(
        question="what color is the shape?", images=[query], demonstrations=demos[:2]
    )
    task = in_model_layout(builtin_task("easyvqa"), model.config)
    shown = [
        Example(f"d{i}", {"question": d.question}, (d.answer,), image=d.images[0])
        for i, d in enumerate(demos)
    ]
    query_example = Example("q", {"question": "what color is the shape?"}, ("green",), image=str(query))
    expected = prompt_to_sample(processor, build_prompt(task, query_example, shown[:2]))
    assert _flat(builder.prepare(parts).sample) == _flat(expected)
    # With no demonstrations it is the zero-shot request.
    alone = builder.request_parts(question="what color is the shape?", images=[query])
    assert _flat(builder.prepare(alone).sample) == _flat(
        prompt_to_sample(processor, build_prompt(task, query_example, []))
    )
    with pytest.raises(InputError, match="demonstration 0: it has no answer"):
        builder.request_parts(question="q", demonstrations=[Demonstration(" ", "q")])


def test_demonstrations_are_read_from_records_and_bad_lines_are_named(tmp_path):
    folder = tmp_path
    rows = [
        *_pool(folder),
        {"kind": "image_text", "image": str(_image(folder, "red")), "text": "a red square"},
    ]
    demos = read_demonstrations(_write(folder / "ok.jsonl", rows))
    assert [d.answer for d in demos] == ["red", "green", "blue", "a red square"]
    assert demos[3].question is None and demos[0].question == "what color is the shape?"
    bad = _write(
        folder / "bad.jsonl", [rows[0], {"kind": "classification", "text": "x", "label": "y"}, rows[1]]
    )
    with pytest.raises(InputError, match=r"bad.jsonl:2: a classification record cannot be a demonstration"):
        read_demonstrations(bad)
    broken = _write(folder / "broken.jsonl", [rows[0], '{"kind": "vqa", "image": 3'])
    with pytest.raises(InputError, match=r"broken.jsonl:2: invalid JSON.*well-formed record\)$"):
        read_demonstrations(broken)
    with pytest.raises(InputError, match="no records"):
        read_demonstrations(_write(folder / "empty.jsonl", []))


def test_first_random_and_similar_choices(serving_model_dir, tmp_path):
    demos = read_demonstrations(_write(tmp_path / "demos.jsonl", _pool(tmp_path)))
    assert choose_demonstrations(demos, 2, "first") == demos[:2]
    assert choose_demonstrations(demos, None, "first") == demos
    drawn = choose_demonstrations(demos, 2, "random", seed=1)
    assert drawn == choose_demonstrations(demos, 2, "random", seed=1) and len(set(map(id, drawn))) == 2
    engine = Engine.from_pretrained(str(serving_model_dir), device="cpu")
    try:
        request = {"question": "what color is the shape?", "images": [str(_image(tmp_path, "blue"))]}
        near = choose_demonstrations(demos, 3, "similar", engine=engine, request=request)
        assert sorted(d.answer for d in near) == sorted(COLOURS)
        assert near[-1].answer == "blue"  # the same image and question: the most similar, next to the request
    finally:
        engine.close()
    with pytest.raises(InputError, match="--shots 4: give 0 to 3"):
        choose_demonstrations(demos, 4, "first")


def test_generate_shows_the_chosen_demonstrations(serving_model_dir, tmp_path, capsys):
    demos = _write(tmp_path / "demos.jsonl", _pool(tmp_path))
    query = str(_image(tmp_path, "red"))
    alone = generate(str(serving_model_dir), question="what color?", images=[query], max_new_tokens=3,
                     as_json=True, output=io.StringIO())  # fmt: skip
    args = ["generate", "--model", str(serving_model_dir), "--question", "what color?", "--image", query,
            "--max-new-tokens", "3", "--json"]  # fmt: skip
    assert main([*args, "--demos", demos, "--shots", "2", "--choose", "similar"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["demonstrations"] == [] and len(report["demonstrations"]) == 2
    assert report["demonstrations"][-1] == "red" and report["prompt_tokens"] > alone["prompt_tokens"]
    bad = _write(tmp_path / "bad.jsonl", ['{"kind": "vqa"}'])
    assert main([*args, "--demos", bad]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "--shots", "2"]) == 2  # nothing to pick from
    assert "--shots and --choose pick among --demos FILE" in capsys.readouterr().err
    many = _write(tmp_path / "many.jsonl", _pool(tmp_path) * 40)
    assert main([*args, "--demos", many]) == 2
    assert "after 120 demonstrations takes" in capsys.readouterr().err


def test_chat_and_serve_show_the_pool_before_every_request(serving_model_dir, tmp_path):
    """`metalm chat/serve --demos`: the engine's chat prompt after the pool's demonstrations is the prompt
    `generate --demos` sends for the same request; similar ones are chosen per request; a pool whose longest
    demonstrations leave no room is refused at start-up."""
    demos = read_demonstrations(_write(tmp_path / "demos.jsonl", _pool(tmp_path)))
    engine = Engine.from_pretrained(str(serving_model_dir), device="cpu")
    try:
        blue = str(_image(tmp_path, "blue"))
        attach_demonstrations(engine, demos, 2, "first", limit=engine.context_length)
        chat = engine.prepare(engine.chat_parts([ChatMessage("user", "what color?", [blue])])).sample
        asked = engine.prompts.request_parts(question="what color?", images=[blue], demonstrations=demos[:2])
        assert _flat(chat) == _flat(engine.prepare(asked).sample)
        attach_demonstrations(engine, demos, 1, "similar")
        for colour in COLOURS:
            parts = engine.chat_parts(
                [ChatMessage("user", "what color is the shape?", [str(_image(tmp_path, colour))])]
            )
            assert parts[3] == colour  # [image] Enc(question) answer: <the nearest one's answer> EOS ...
        with pytest.raises(InputError, match="3 demonstrations may take .* show fewer"):
            attach_demonstrations(engine, demos, 3, "random", limit=20)
        engine.demonstrations = None
        out = io.StringIO()
        lines = iter(["what color?", "/quit"])
        chat_command(
            engine,
            max_new_tokens=2,
            input_fn=lambda _: next(lines),
            output=out,
            demonstrations=demos,
            shots=1,
        )
        assert engine.demonstrations.shots == 1 and out.getvalue().count("assistant> ") == 1
    finally:
        engine.close()
    assert (
        main(["serve", "--model", str(serving_model_dir), "--choose", "similar"]) == 2
    )  # nothing to choose from


def test_a_pool_reads_its_images_once_and_prompts_as_from_its_files(serving_model_dir, tmp_path, monkeypatch):
    """A server's pool keeps its images cropped and resized as the vision encoder reads them: requests after
    it read none of the pool's files, and prepare exactly the prompt the files give."""
    rows = []
    for i, colour in enumerate(COLOURS):  # non-square and larger than the encoder's input: crop and resize
        path = tmp_path / f"big-{colour}.png"
        Image.new("RGB", (90 + 7 * i, 61), COLOURS[colour]).save(path)
        rows.append({"kind": "vqa", "image": str(path), "question": "what color is it?", "answer": colour})
    demos = read_demonstrations(_write(tmp_path / "big.jsonl", rows))
    engine = Engine.from_pretrained(str(serving_model_dir), device="cpu")
    try:
        size = engine.processor.preprocessors[engine.prompts.vision_encoders[0]].size
        pool = attach_demonstrations(engine, demos, 3, "first")
        assert all(d.images[0].size == (size, size) for d in pool.demos)
        from metalm.serving import prompts as prompts_module

        read = []
        real = prompts_module.load_image
        monkeypatch.setattr(
            prompts_module, "load_image", lambda src, **kw: read.append(src) or real(src, **kw)
        )
        query = str(_image(tmp_path, "blue"))
        chat = engine.prepare(engine.chat_parts([ChatMessage("user", "what color is it?", [query])])).sample
        assert not {str(src) for src in read} & {row["image"] for row in rows}  # none of the pool's files
        assert read  # (the probe sees the reads: the pool's held images pass through it, read from memory)
        from_files = engine.prompts.request_parts(
            question="what color is it?", images=[query], demonstrations=demos
        )
        assert _flat(chat) == _flat(engine.prepare(from_files).sample)
        # `similar` reads the pool through the encoders from the held images: each file read once, to fit it.
        read.clear()
        attach_demonstrations(engine, demos, 1, "similar")
        files = sorted(str(src) for src in read if isinstance(src, str))
        assert files == sorted(row["image"] for row in rows)
    finally:
        engine.close()

"""Evaluation prompts: in-context prompts put inputs in the encoder and labels in the decoder, each
demonstration's image is encoded on its own, baseline mode puts every input in decoder text (and is
detected for a model without a text encoder), demonstrations are sampled per seed without the query, and
long inputs are split to fit the text encoder."""

from __future__ import annotations

import json

import pytest
import torch

from metalm import Encode, EncodedSegment, ImageInput, TextSegment
from metalm.evaluation.icl import (
    Separator,
    build_prompt,
    describe_prompt,
    prompt_to_sample,
    resolve_baseline,
    sample_demonstrations,
    split_for_encoder,
)
from metalm.evaluation.runner import evaluate
from metalm.evaluation.tasks import Example, Task, TaskError
from metalm.modalities.text import TEXT
from metalm.model.configuration_metalm import MetaLMConfig
from tests.evaluation_helpers import image_file, sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: one thread (conftest.py)

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


def test_icl_prompt_puts_inputs_in_encoder_and_labels_in_decoder(tiny):
    _, processor = tiny
    task = sentiment_task(TOY)
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
        image_file(tmp_path, f"{i}.png", c) for i, c in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)])
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
    task = sentiment_task(TOY)
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

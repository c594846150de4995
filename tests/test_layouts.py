"""Prompt layouts: requests are laid out the way the model was trained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image
from pydantic import ValidationError

from metalm.data.layouts import DEFAULT_LAYOUTS, PromptLayout, chat_layout_parts, layouts_of
from metalm.modalities.text import Encode
from metalm.modalities.vision import ImageInput

RED = Image.new("RGB", (8, 8), "red")


def test_vqa_layout_encodes_the_question_and_keeps_answer_in_the_decoder():
    parts = DEFAULT_LAYOUTS.vqa.parts(
        [RED], text_encoder="text", vision_encoder="vision", question="what color?"
    )
    assert isinstance(parts[0], ImageInput) and parts[0].encoder == "vision"
    assert parts[1] == Encode("question: what color?", encoder="text")
    assert parts[2] == "answer:"


def test_without_a_text_encoder_the_input_is_decoder_text():
    parts = DEFAULT_LAYOUTS.vqa.parts([], text_encoder=None, question="is it red?")
    assert parts == ["question: is it red?", "answer:"]


def test_saved_layouts_override_defaults_and_bad_ones_are_refused():
    config = SimpleNamespace(prompt_layouts={"vqa": {"template": "Q: {question}", "prompt": "A:"}})
    layouts = layouts_of(config)
    assert layouts.vqa == PromptLayout(template="Q: {question}", prompt="A:")
    assert layouts.caption == DEFAULT_LAYOUTS.caption
    assert layouts_of(SimpleNamespace()) == DEFAULT_LAYOUTS
    with pytest.raises(ValidationError):
        layouts_of(SimpleNamespace(prompt_layouts={"vqa": {"templat": "typo"}}))


def test_chat_history_reads_as_demonstrations_in_the_trained_layout():
    turns = [
        {"role": "user", "text": "what shape?", "images": [RED]},
        {"role": "assistant", "text": "circle"},
        {"role": "user", "text": "what color?"},
    ]
    parts = chat_layout_parts(
        turns, DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="vision", history="demonstrations"
    )
    assert [type(p).__name__ for p in parts] == [
        "ImageInput", "Encode", "str", "str", "NoneType", "Encode", "str",
    ]  # fmt: skip
    assert parts[2:5] == ["answer:", "circle", None]
    assert parts[-2:] == [Encode("question: what color?", encoder="text"), "answer:"]
    with pytest.raises(ValueError, match="chat history must be one of"):
        chat_layout_parts(turns, DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="v", history="all")


def test_chat_answers_the_latest_question_with_the_image_in_view():
    """By default only the last user turn is the request, in the single-request layout training uses; a
    follow-up without an image takes the latest image shown, a new image replaces it."""
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    turns = [
        {"role": "user", "text": "what shape?", "images": [RED]},
        {"role": "assistant", "text": "circle"},
        {"role": "user", "text": "and this one?", "images": [blue]},
        {"role": "assistant", "text": "square"},
        {"role": "user", "text": "what color?"},
    ]
    parts = chat_layout_parts(turns, DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="vision")
    assert parts == [
        ImageInput(blue, encoder="vision"), Encode("question: what color?", encoder="text"), "answer:",
    ]  # fmt: skip
    alone = chat_layout_parts(turns[:1], DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="vision")
    assert alone == chat_layout_parts(
        turns[:1], DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="vision", history="demonstrations"
    )
    text_only = [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}, turns[-1]]
    assert chat_layout_parts(text_only, DEFAULT_LAYOUTS, text_encoder="text", vision_encoder="v") == [
        Encode("question: what color?", encoder="text"), "answer:",
    ]  # fmt: skip


def test_an_image_alone_is_a_caption_request():
    parts = chat_layout_parts(
        [{"role": "user", "text": "", "images": [RED]}],
        DEFAULT_LAYOUTS,
        text_encoder="text",
        vision_encoder="v",
    )
    assert len(parts) == 1 and isinstance(parts[0], ImageInput)


def test_layouts_follow_the_training_streams():
    from metalm.training.config import StreamConfig, layouts_from_streams

    streams = [
        StreamConfig(source="bbc_news_text"),
        StreamConfig(source="easy_vqa_captions"),
        StreamConfig(source="easy_vqa_vqa", template="Q: {question}", prompt="A:"),
    ]
    layouts = layouts_of(SimpleNamespace(prompt_layouts=layouts_from_streams(streams)))
    assert layouts.vqa == PromptLayout(template="Q: {question}", prompt="A:")
    assert layouts.caption == PromptLayout()  # lm-format captions: the image, then the caption
    assert layouts.classification == DEFAULT_LAYOUTS.classification
    # Trained further on classification only: the VQA layout it had is kept.
    more = [StreamConfig(source="bbc_news", format="instruction", template="{text} topic?", prompt="")]
    kept = layouts_of(SimpleNamespace(prompt_layouts=layouts_from_streams(more, layouts.model_dump())))
    assert kept.vqa == layouts.vqa and kept.classification.template == "{text} topic?"


def test_auto_classes_load_a_saved_model_and_its_processor(tiny_saved):
    """The Hugging Face way works: AutoModelForCausalLM + AutoProcessor on a saved folder."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    import metalm

    model = AutoModelForCausalLM.from_pretrained(tiny_saved)
    processor = AutoProcessor.from_pretrained(tiny_saved)
    assert isinstance(model, metalm.MetaLMForCausalLM) and isinstance(processor, metalm.MetaLMProcessor)
    batch = processor([[RED, metalm.Encode("question: what color?"), "answer:"]])
    out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


@pytest.mark.parametrize(
    "text",
    ["a t-shirt, 3.5 inches; don't go", "the e-mail at 10:30 and/or later", "a man's black-and-white cap."],
)
def test_wordpiece_decode_writes_what_a_person_would(tiny, text):
    _, processor = tiny
    assert processor.decode(processor.tokenize(text)) == text.lower()


def test_evaluation_asks_in_the_models_trained_layout():
    from metalm.evaluation.tasks import builtin_task, in_model_layout

    task = builtin_task("easyvqa")
    trained = SimpleNamespace(prompt_layouts={"vqa": {"template": "Q: {question}", "prompt": "A:"}})
    asked = in_model_layout(task, trained)
    assert (asked.input_template, asked.decoder_prompt) == ("Q: {question}", "A:")
    # Demonstrations and query alike: in-context rows repeat the trained layout.
    assert (asked.fewshot_input_template, asked.fewshot_decoder_prompt) == ("Q: {question}", "A:")
    # No saved layouts, or a task that names none: unchanged.
    assert in_model_layout(task, SimpleNamespace()) is task
    assert in_model_layout(builtin_task("bbc-topic"), trained).input_template == "{text}"

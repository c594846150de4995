"""Speech through the interfaces: evaluation tasks and WER, `metalm generate --audio`, and the server's
OpenAI `input_audio` content parts (with OpenAI-shaped 400s for what it refuses). A tiny random model with
a text, a vision and an audio encoder; generated tones stand in for speech."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from metalm import EncoderRecipe, ModelRecipe, build_metalm
from metalm.data.audio import SAMPLING_RATE
from metalm.evaluation.icl import build_prompt, describe_prompt, prompt_to_sample
from metalm.evaluation.metrics import normalize_transcript, word_error_rate
from metalm.evaluation.tasks import Example, builtin_task
from metalm.modalities.audio import AudioInput
from metalm.serving.cli import generate
from metalm.serving.engine import Engine
from metalm.serving.request_types import ChatMessage
from tests.conftest import TINY_BERT, TINY_LLAMA, TINY_VIT
from tests.test_audio import TINY_WHISPER, tone, wav_bytes

soundfile = pytest.importorskip("soundfile")
pytest.importorskip("jiwer")


def _build_audio_model(path):
    """A tiny random MetaLM with text, vision and audio encoders, saved at `path` (returned)."""
    torch.manual_seed(0)
    recipe = ModelRecipe(
        decoder=TINY_LLAMA,
        tokenizer="packaged:minilm-l6",
        encoders=[
            EncoderRecipe("text", "text", source="config", tokenizer="decoder", config=TINY_BERT),
            EncoderRecipe("vision", "vision", source="config", config=TINY_VIT, image_size=32),
            EncoderRecipe("speech", "audio", source="config", config={**TINY_WHISPER, "max_seconds": 2}),
        ],
    )
    model, processor = build_metalm(recipe)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _build_audio_model(tmp_path_factory.mktemp("audio_model"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "q.wav"
    soundfile.write(path, tone(440, 0.6), SAMPLING_RATE)
    return path


# --- evaluation --------------------------------------------------------------------------------------------
def test_word_error_rate_compares_normalised_words():
    assert normalize_transcript("Hello, World!  It's") == "hello world it's"
    assert word_error_rate(["hello world"], ["Hello, world."]) == 0.0
    assert word_error_rate(["hello there world", ""], ["hello world", "a b"]) == pytest.approx(3 / 4)


def test_spoken_tasks_hear_the_clip_where_typed_ones_read_the_question(model_dir, clip):
    from metalm import MetaLMProcessor

    processor = MetaLMProcessor.from_pretrained(model_dir)
    spoken, typed = builtin_task("easyvqa-spoken"), builtin_task("easyvqa-spoken-typed")
    ex = Example(
        id="q", fields={"question": "what color is it?"}, answers=("red",), image=None, audio=str(clip)
    )
    parts = build_prompt(spoken, ex)
    assert describe_prompt(parts) == "<audio:q.wav> answer:"
    sample = prompt_to_sample(processor, parts)
    assert [type(seg).__name__ for seg in sample] == ["TextSegment", "EncodedSegment", "TextSegment"]
    typed_parts = build_prompt(typed, Example("q", {"question": "what color is it?"}, ("red",)))
    assert "[enc: question: what color is it?]" in describe_prompt(typed_parts)
    transcribe = builtin_task("speech-transcribe")
    assert transcribe.metric == "wer" and transcribe.scoring == "generate"
    metrics = transcribe.compute_metrics(["the cat"], [Example("a", {}, ("The cat.",), audio=str(clip))])
    assert metrics == {"wer": 0.0, "n": 1}


# --- generate ------------------------------------------------------------------------------------------------
def test_generate_transcribes_a_clip_or_answers_a_spoken_question(model_dir, clip, tmp_path):
    from PIL import Image

    engine = Engine.from_pretrained(model_dir, device="cpu")
    try:
        out = io.StringIO()
        report = generate(engine, audio=[str(clip)], max_new_tokens=3, as_json=True, output=out)
        assert report["audio"] == [str(clip)] and report["prompt_tokens"] > 1
        image = tmp_path / "red.png"
        Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
        spoken = generate(
            engine, images=[str(image)], audio=[str(clip)], max_new_tokens=2, as_json=True, output=out
        )
        assert spoken["prompt_tokens"] > report["prompt_tokens"]  # the image's slots and "answer:"
        parts = engine.chat_parts([ChatMessage("user", "", images=[], audio=[str(clip)])])
        assert len(parts) == 1 and isinstance(parts[0], AudioInput)
    finally:
        engine.close()


# --- serving -------------------------------------------------------------------------------------------------
def _audio_request(data: str, fmt: str = "wav", text: str | None = None) -> dict:
    content = [{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]
    if text:
        content.insert(0, {"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def _b64(samples: np.ndarray, fmt: str = "WAV") -> str:
    return base64.b64encode(wav_bytes(samples, fmt=fmt)).decode()


@pytest.mark.parametrize(
    ("request_body", "code", "param"),
    [
        (_audio_request(_b64(tone(440, 0.5)), fmt="flac"), "invalid_audio_format", ".input_audio.format"),
        (_audio_request("!!not base64!!"), "invalid_audio", ".input_audio.data"),
        (
            _audio_request(base64.b64encode(b"RIFF....WAVEjunk").decode()),
            "invalid_audio",
            ".input_audio.data",
        ),
        (_audio_request(_b64(tone(440, 2.5))), "audio_too_long", ".input_audio.data"),
    ],
)
def test_the_server_refuses_bad_audio_in_openais_shape(model_dir, request_body, code, param):
    from fastapi.testclient import TestClient

    from metalm.serving.server import ServerSettings, create_app

    engine = Engine.from_pretrained(model_dir, device="cpu", name="tiny")
    try:
        with TestClient(create_app(engine, ServerSettings()), base_url="http://127.0.0.1") as client:
            response = client.post("/v1/chat/completions", json=request_body)
    finally:
        engine.close()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == "messages[0].content[0]" + param
    assert error["type"] == "invalid_request_error"


def test_the_server_answers_input_audio(model_dir):
    from fastapi.testclient import TestClient

    from metalm.serving.server import ServerSettings, create_app

    engine = Engine.from_pretrained(model_dir, device="cpu", name="tiny")
    try:
        with TestClient(
            create_app(engine, ServerSettings(max_audio_clips=1)), base_url="http://127.0.0.1"
        ) as client:
            ok = client.post("/v1/chat/completions", json=_audio_request(_b64(tone(300, 0.5)), text="what?"))
            body = _audio_request(_b64(tone(300, 0.5)))
            body["messages"][0]["content"] *= 2
            too_many = client.post("/v1/chat/completions", json=body)
    finally:
        engine.close()
    assert ok.status_code == 200, ok.text
    assert json.loads(ok.text)["usage"]["prompt_tokens"] > 3
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_audio_clips"

"""Serving: the engine (prompts, batching, streaming, stop strings), the OpenAI-compatible server driven by
the `openai` client against a live uvicorn on loopback, its refusals, a bounded load test and the CLI."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from metalm import Encode, ImageInput, InputError
from metalm.serving.cli import chat, generate, main
from metalm.serving.engine import Engine
from metalm.serving.generation import ChoiceRow
from metalm.serving.request_types import ChatMessage, QueueFull, SamplingParams
from metalm.serving.server import APIError, ImageResolver, ServerSettings, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL_NAME = "tiny-metalm"
TEST_SETTINGS = dict(
    model_name=MODEL_NAME,
    max_body_bytes=1_000_000,
    max_image_bytes=200_000,
    max_image_pixels=1_000_000,
    max_tokens_limit=64,
    default_max_tokens=8,
    request_timeout_s=30.0,
)
_BUILT: dict[str, Path] = {}


# --- fixtures and helpers (test_webpage.py imports these) ----------------------------------------------
@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory) -> Path:
    """A tiny random MetaLM (text + vision encoders) saved once per session."""
    if "dir" not in _BUILT:
        from tests.conftest import build_tiny

        model, processor = build_tiny(seed=1)
        path = tmp_path_factory.mktemp("serving_model")
        model.save_pretrained(path)
        processor.save_pretrained(path)
        _BUILT["dir"] = path
    return _BUILT["dir"]


class LiveServer:
    """uvicorn in a background thread on a free loopback port (the socket is bound first: no race)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(condition, timeout: float = 20.0, what: str = "the condition") -> None:
    """Polls `condition` until it holds; fails the test (instead of hanging) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def start_live_server(model_dir: Path, **overrides):
    """(engine, LiveServer) for a saved model; the caller enters the server and closes the engine."""
    engine = Engine.from_pretrained(model_dir, device="cpu", name=MODEL_NAME, max_batch_size=16)
    settings = ServerSettings(**{**TEST_SETTINGS, **overrides})
    return engine, LiveServer(create_app(engine, settings))


def png_data_url(size: tuple[int, int] = (24, 24), noise: bool = False, seed: int = 0) -> str:
    if noise:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr)
    else:
        img = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def live(serving_model_dir):
    engine, server = start_live_server(serving_model_dir)
    with server:
        yield engine, server.url
    engine.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _user(text: str, *images: str) -> list[dict]:
    content = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in images
    ]
    return [{"role": "user", "content": content}]


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


# --- the HTTP API with the openai client --------------------------------------------------------------
def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    health = httpx.get(live[1] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME


def test_text_request(client, live):
    engine, _ = live
    messages = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "what is a cat?"},
    ]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The server builds the same prompt as the engine's chat template.
    direct = engine.generate(
        [ChatMessage("system", "answer briefly"), ChatMessage("user", "what is a cat?")],
        SamplingParams(max_new_tokens=6, temperature=0),
    )
    assert choice.message.content == direct.completions[0].text
    assert r.usage.prompt_tokens == direct.prompt_tokens


def test_image_request(client, live):
    engine, _ = live
    text_only = client.chat.completions.create(model=MODEL_NAME, messages=_user("what colour?"), max_tokens=4)
    with_image = client.chat.completions.create(
        model=MODEL_NAME, messages=_user("what colour?", png_data_url()), max_tokens=4, temperature=0
    )
    assert with_image.choices[0].message.content
    slots = engine.config.num_slots("vision")
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + slots


def test_a_server_pool_of_demonstrations_goes_before_every_request(client, live, tmp_path):
    """`metalm serve --demos`: each request's prompt is the engine's, after the pool's demonstrations."""
    from metalm.serving.demonstrations import attach_demonstrations
    from metalm.serving.request_types import Demonstration

    engine, _ = live
    Image.new("RGB", (24, 24), (0, 200, 0)).save(tmp_path / "green.png")
    demos = [Demonstration("green", "what colour?", [str(tmp_path / "green.png")])]
    plain = client.chat.completions.create(model=MODEL_NAME, messages=_user("what colour?"), max_tokens=2)
    attach_demonstrations(engine, demos, 1, "first", limit=engine.context_length)
    try:
        shown = client.chat.completions.create(model=MODEL_NAME, messages=_user("what colour?"), max_tokens=2)
        expected = engine.prepare(engine.chat_parts([ChatMessage("user", "what colour?")]))
    finally:
        engine.demonstrations = None
    assert shown.usage.prompt_tokens == expected.num_tokens > plain.usage.prompt_tokens


def test_streamed_request(client, live):
    messages = _user("tell me a story", png_data_url())
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # The raw wire format: SSE "data:" lines ending with [DONE].
    body = {"model": MODEL_NAME, "messages": _user("hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live[1] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_n_two(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=_user("hi"), max_tokens=5, n=2, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 10


def _bad(kind: str):
    if kind == "bad_base64":
        return {"messages": _user("x", "data:image/png;base64,@@not-base64@@")}
    if kind == "not_an_image":
        return {"messages": _user("x", "data:image/png;base64," + base64.b64encode(b"hello world").decode())}
    if kind == "oversize_image":  # noise does not compress: > 200 kB
        return {"messages": _user("x", png_data_url((300, 300), noise=True))}
    if kind == "too_many_pixels":  # a small file that decodes to 1.4 M pixels (decompression-bomb check)
        return {"messages": _user("x", png_data_url((1200, 1200)))}
    if kind == "unknown_model":
        return {"model": "gpt-4o", "messages": _user("x")}
    if kind == "file_url":
        return {"messages": _user("x", "file:///etc/passwd")}
    if kind == "http_url":
        return {"messages": _user("x", "http://example.com/cat.png")}
    if kind == "plain_path":
        return {"messages": _user("x", "/etc/hosts")}
    if kind == "max_tokens":
        return {"messages": _user("x"), "max_tokens": 100_000}
    if kind == "temperature":
        return {"messages": _user("x"), "temperature": 7}
    if kind == "n":
        return {"messages": _user("x"), "n": 50}
    if kind == "empty_messages":
        return {"messages": []}
    if kind == "bad_role":
        return {"messages": [{"role": "tool", "content": "x"}]}
    if kind == "image_for_assistant":
        return {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}],
                }
            ]
        }
    raise AssertionError(kind)


BAD = {
    "bad_base64": (400, "invalid_image"),
    "not_an_image": (400, "invalid_image"),
    "oversize_image": (400, "image_too_large"),
    "too_many_pixels": (400, "image_too_large"),
    "unknown_model": (404, "model_not_found"),
    "file_url": (400, "image_url_not_allowed"),
    "http_url": (400, "image_url_not_allowed"),
    "plain_path": (400, "image_url_not_allowed"),
    "max_tokens": (400, "invalid_value"),
    "temperature": (400, "invalid_value"),
    "n": (400, "invalid_value"),
    "empty_messages": (400, "invalid_value"),
    "bad_role": (400, "invalid_value"),
    "image_for_assistant": (400, None),
}


def _assert_error_shape(body: dict) -> dict:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_requests_with_openai_client(client, kind):
    status, code = BAD[kind]
    request = {"model": MODEL_NAME, "max_tokens": 4, **_bad(kind)}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    error = _assert_error_shape(info.value.response.json())
    assert error["code"] == code


def _part(part: dict) -> list[dict]:
    return [{"role": "user", "content": [part]}]


# Refusals by the request schema: (status, code, param), the param a path into the request.
SCHEMA_REFUSALS = {
    "no model": ({"model": None}, (400, "missing_required_parameter", "model")),
    "text part not a string": ({"messages": _part({"type": "text", "text": 1})}, (400, "invalid_type", "messages[0].content[0].text")),
    "unknown part type": ({"messages": _part({"type": "audio"})}, (400, "invalid_value", "messages[0].content[0]")),
    "image_url not an object": ({"messages": _part({"type": "image_url", "image_url": "x"})}, (400, "invalid_type", "messages[0].content[0].image_url")),
    "message not an object": ({"messages": ["hi"]}, (400, "invalid_type", "messages[0]")),
    "content a number": ({"messages": [{"role": "user", "content": 3}]}, (400, "invalid_type", "messages[0].content")),
    "temperature a string": ({"temperature": "1"}, (400, "invalid_type", "temperature")),
    "n a float": ({"n": 2.0}, (400, "invalid_type", "n")),
    "NaN top_p": ({"top_p": float("nan")}, (400, "invalid_value", "top_p")),
    "five stop strings": ({"stop": ["a"] * 5}, (400, "invalid_value", "stop")),
    "stop too long": ({"stop": "x" * 65}, (400, "invalid_value", "stop")),
    "stream a string": ({"stream": "yes"}, (400, "invalid_type", "stream")),
    "tools": ({"tools": [{"type": "function"}]}, (400, "unsupported_parameter", "tools")),
    "penalty": ({"presence_penalty": 0.5}, (400, "unsupported_parameter", "presence_penalty")),
    "penalty out of range": ({"frequency_penalty": 3}, (400, "invalid_value", "frequency_penalty")),
    "nine images": ({"messages": _user("x", *["data:,"] * 9)}, (400, "too_many_images", "messages[0].content[9]")),
}  # fmt: skip


def test_schema_refusals_name_the_field(live):
    """Validation errors come out in OpenAI's shape, the field named by its path in the request (not by
    pydantic's union branches); empty unsupported options and zero penalties are accepted."""
    url = live[1] + "/v1/chat/completions"
    results = {}
    for name, (fields, _) in SCHEMA_REFUSALS.items():
        body = {"model": MODEL_NAME, "messages": _user("x"), "max_tokens": 2, **fields}
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(
            url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30
        )
        error = _assert_error_shape(r.json())
        results[name] = (r.status_code, error["code"], error["param"])
    assert results == {name: expected for name, (_, expected) in SCHEMA_REFUSALS.items()}
    accepted = {"tools": [], "logit_bias": {}, "presence_penalty": 0, "user": "someone", "top_p": 0}
    body = {"model": MODEL_NAME, "messages": _user("x"), "max_tokens": 2, **accepted}
    assert httpx.post(url, json=body, timeout=30).status_code == 200


def test_malformed_and_oversize_bodies(live):
    url = live[1] + "/v1/chat/completions"
    r = httpx.post(
        url, content=b'{"model": "tiny-metalm", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    _assert_error_shape(r.json())
    r = httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url, content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _assert_error_shape(r.json())["code"] == "request_too_large"

    def chunked():  # no Content-Length: the endpoint counts what it reads
        for _ in range(12):
            yield b" " * 100_000

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.get(live[1] + "/no/such/route")
    assert r.status_code == 404
    _assert_error_shape(r.json())
    page = httpx.get(live[1] + "/")
    assert page.status_code == 200 and "metalm chat" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_server_error_is_generic(live, monkeypatch):
    engine, url = live

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "chat_parts", boom)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": _user("x")})
    assert r.status_code == 500
    error = _assert_error_shape(r.json())
    assert "secret" not in error["message"] and error["type"] == "server_error"


def test_queue_full_and_time_limit(serving_model_dir):
    """With the model busy: requests beyond the limit get 429; one that waits past its time limit gets 408."""
    engine, server = start_live_server(serving_model_dir, max_concurrent_requests=2, request_timeout_s=1.5)
    url = None
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        body = {"model": MODEL_NAME, "messages": _user(name), "max_tokens": 3}
        results[name] = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)

    try:
        with server:
            url = server.url
            with engine.runner.model_lock:
                a = threading.Thread(target=post, args=("a",))
                a.start()
                wait_until(
                    lambda: engine.pending >= 1 and engine.scheduler.queue.empty(), what="a to be taken"
                )
                time.sleep(
                    0.3
                )  # the worker has taken "a" into a batch (10 ms window) and waits for the model
                b = threading.Thread(target=post, args=("b",))
                b.start()
                wait_until(lambda: engine.pending >= 2, what="b to be queued")
                post("c")
                assert results["c"].status_code == 429
                assert _assert_error_shape(results["c"].json())["code"] == "rate_limit_exceeded"
                time.sleep(1.7)  # past b's time limit while it is still queued
            a.join(30)
            b.join(30)
            assert results["a"].status_code == 200  # it ran out of time after its first token
            assert results["a"].json()["usage"]["completion_tokens"] <= 1
            assert results["b"].status_code == 408
            assert _assert_error_shape(results["b"].json())["code"] == "timeout"
    finally:
        engine.close()


def test_client_disconnect_frees_the_row(serving_model_dir):
    """A client that goes away (streamed or not) cancels its rows instead of generating for nobody."""
    engine, server = start_live_server(serving_model_dir)
    decode = engine.runner.decode

    def slow_decode(ids):  # 64 tokens x 40 ms: a 2.6 s answer
        time.sleep(0.04)
        return decode(ids)

    engine.runner.decode = slow_decode
    body = {
        "model": MODEL_NAME,
        "messages": _user("a long answer please"),
        "max_tokens": 64,
        "temperature": 0,
    }
    try:
        with server:
            for stream in (True, False):
                start = time.monotonic()
                try:
                    with httpx.stream(
                        "POST",
                        server.url + "/v1/chat/completions",
                        json={**body, "stream": stream},
                        timeout=0.3,
                    ) as response:
                        for i, _ in enumerate(response.iter_lines()):
                            if i >= 2:
                                break
                except httpx.ReadTimeout:
                    assert not stream
                wait_until(lambda: not engine.pending, timeout=10, what="the row to be freed")
                assert time.monotonic() - start < 1.8, stream  # well before the answer would end
    finally:
        engine.close()


def test_stream_frees_its_slot_when_the_body_never_starts():
    """A client gone before the first chunk (the chunk generator never runs, so its own cleanup cannot)
    still frees the batch row and the in-flight slot."""
    from starlette.requests import ClientDisconnect

    from metalm.serving.completions import _EventStream
    from metalm.serving.state import InFlightLimiter

    class FakeJob:
        done, cancelled = False, False

        def cancel(self):
            self.cancelled = True

    started = []

    async def chunks():
        started.append(True)
        yield b"data: [DONE]\n\n"

    async def send(message):
        raise OSError("the client is gone")

    async def receive():
        return {"type": "http.disconnect"}

    limiter, job = InFlightLimiter(1), FakeJob()
    response = _EventStream(chunks(), job, limiter.acquire())
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        asyncio.run(response(scope, receive, send))
    assert not started and job.cancelled and limiter.count == 0


def test_load_concurrent_clients(client, live):
    """8 concurrent clients x 3 requests (text, image, streamed): no failures, and requests get batched."""
    engine, _ = live
    before = len(engine.runner.batch_sizes)

    def session(i: int) -> list[str]:
        out = []
        for k in range(3):
            if k == 0:
                r = client.chat.completions.create(
                    model=MODEL_NAME, messages=_user(f"client {i}"), max_tokens=6
                )
                out.append(r.choices[0].message.content)
            elif k == 1:
                r = client.chat.completions.create(
                    model=MODEL_NAME, messages=_user(f"image {i}", png_data_url(seed=i)), max_tokens=6
                )
                out.append(r.choices[0].message.content)
            else:
                stream = client.chat.completions.create(
                    model=MODEL_NAME, messages=_user(f"stream {i}"), max_tokens=6, stream=True
                )
                out.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        return out

    with ThreadPoolExecutor(8) as pool:
        answers = [a for result in pool.map(session, range(8)) for a in result]
    assert len(answers) == 24 and all(isinstance(a, str) for a in answers)
    assert max(engine.runner.batch_sizes[before:]) > 1


# --- cross-site requests, DNS rebinding, API key --------------------------------------------------------
def _chat_body(**extra) -> str:
    return json.dumps({"model": MODEL_NAME, "messages": _user("hi"), "max_tokens": 2, **extra})


def test_cross_site_and_rebinding_requests_are_refused(live):
    base = live[1]
    url, port = base + "/v1/chat/completions", base.rsplit(":", 1)[1]
    as_json = {"content-type": "application/json"}
    # A text/plain POST is a "simple" request any web page may send cross-site without a preflight.
    refusals = {
        "text/plain": httpx.post(url, content=_chat_body(), headers={"content-type": "text/plain"}),
        "form": httpx.post(url, content="a=b", headers={"content-type": "application/x-www-form-urlencoded"}),
        "foreign Host": httpx.post(url, content=_chat_body(), headers={**as_json, "host": f"evil.example:{port}"}),
        "rebound page": httpx.get(base + "/", headers={"host": "evil.example"}),
        "foreign Origin": httpx.post(url, content=_chat_body(), headers={**as_json, "origin": "https://evil.example"}),
        "null Origin": httpx.get(base + "/v1/models", headers={"origin": "null"}),
        "other port": httpx.get(base + "/v1/models", headers={"origin": "http://127.0.0.1:1"}),
    }  # fmt: skip
    codes = {name: (r.status_code, _assert_error_shape(r.json())["code"]) for name, r in refusals.items()}
    assert codes == {
        "text/plain": (415, "unsupported_media_type"),
        "form": (415, "unsupported_media_type"),
        "foreign Host": (400, "host_not_allowed"),
        "rebound page": (400, "host_not_allowed"),
        "foreign Origin": (403, "origin_not_allowed"),
        "null Origin": (403, "origin_not_allowed"),
        "other port": (403, "origin_not_allowed"),
    }
    # The page's own origin, a charset parameter, localhost by name and no Origin at all are fine.
    ok = [
        httpx.post(url, content=_chat_body(), headers={"content-type": "application/json; charset=utf-8",
                                                       "origin": base}),
        httpx.get(f"http://localhost:{port}/v1/models"),
        httpx.get(base + "/health"),
    ]  # fmt: skip
    assert [r.status_code for r in ok] == [200, 200, 200]


def test_allowed_hosts_origins_and_api_key(serving_model_dir, monkeypatch):
    import hmac

    compared: list[bytes] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
    engine, server = start_live_server(
        serving_model_dir, allowed_hosts=("api.example",), allowed_origins=("https://app.example",),
        api_key="s3cret",
    )  # fmt: skip
    key = {"authorization": "Bearer s3cret"}
    try:
        with server:
            models = server.url + "/v1/models"
            assert httpx.get(models, headers={**key, "host": "api.example:443"}).status_code == 200
            assert (
                httpx.get(models, headers={**key, "host": "127.0.0.1"}).status_code == 400
            )  # not listed now
            assert (
                httpx.get(
                    models, headers={**key, "host": "api.example", "origin": "https://app.example"}
                ).status_code
                == 200
            )
            assert (
                httpx.get(
                    models, headers={**key, "host": "api.example", "origin": "http://app.example"}
                ).status_code
                == 403
            )
            host = {"host": "api.example"}
            for headers in ({}, {"authorization": "Bearer s3crex"}, {"authorization": "s3cret"}):
                r = httpx.get(models, headers={**host, **headers})
                assert r.status_code == 401 and _assert_error_shape(r.json())["code"] == "invalid_api_key"
            r = httpx.post(server.url + "/v1/chat/completions", content=_chat_body(),
                           headers={**host, **key, "content-type": "application/json"})  # fmt: skip
            assert r.status_code == 200
    finally:
        engine.close()
    assert b"Bearer s3crex" in compared  # the key is compared in constant time


# --- no 500s from input -----------------------------------------------------------------------------------
def _raw_bodies() -> dict[str, str]:
    head = f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "hi"}}]'
    return {
        "5000-digit max_tokens": head + ', "max_tokens": ' + "9" * 5000 + "}",
        "400-digit temperature": head + ', "temperature": ' + "9" * 400 + "}",
        "400-digit n": head + ', "n": -' + "9" * 400 + "}",
        "nested 100k deep": head + ', "user": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "lone surrogate in content": f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}',
        "lone surrogate in model": '{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}',
        "lone surrogate in stop": head + ', "stop": ["\\ud800"]}',
        "NUL in a file URL": f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": [{{"type": "image_url", '
        '"image_url": {"url": "file:///ALLOWED/ok.png%00.txt"}}]}]}',
    }  # fmt: skip


def test_hostile_bodies_are_400s_not_500s(serving_model_dir, tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    engine, server = start_live_server(serving_model_dir, allow_image_dirs=(str(tmp_path),))
    try:
        with server, caplog.at_level("INFO", logger="metalm.serving"):
            results = {}
            for name, body in _raw_bodies().items():
                r = httpx.post(
                    server.url + "/v1/chat/completions", content=body.replace("/ALLOWED", str(tmp_path)),
                    headers={"content-type": "application/json"}, timeout=30,
                )  # fmt: skip
                results[name] = (r.status_code, _assert_error_shape(r.json())["type"])
    finally:
        engine.close()
    assert results == {name: (400, "invalid_request_error") for name in _raw_bodies()}
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]  # no stack trace logged


# --- image decoding: sizes, budget, concurrency, memory ------------------------------------------------------
def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_images_decode_straight_to_the_encoder_size():
    from metalm.data.images import DecodeBudget, load_image

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 2000, 3), dtype=np.uint8))
    budget = DecodeBudget(10**9)
    jpeg = load_image(_encoded(photo, "JPEG"), target_size=32, budget=budget)
    assert budget.used == 250 * 125  # decoded at 1/8 scale: the full 2 M pixels never existed
    assert min(jpeg.size) >= 64 and jpeg.size == (250, 125)
    png = load_image(_encoded(photo, "PNG"), target_size=32, budget=budget)
    assert png.size == (134, 67)  # reduced by an integer factor (15, rounding up): both sides >= 2 x 32
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(load_image(_encoded(small, "PNG"), target_size=32)), np.asarray(small))


def test_decodes_at_once_are_bounded(monkeypatch):
    import metalm.serving.resolver as resolver_module

    active, peak, lock = [0], [0], threading.Lock()
    real = resolver_module.load_image

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(resolver_module, "load_image", counting)
    resolver = ImageResolver(ServerSettings(max_concurrent_decodes=2))

    async def many():
        return await asyncio.gather(*(resolver.resolve(png_data_url(seed=i), f"p{i}") for i in range(8)))

    assert len(asyncio.run(many())) == 8
    assert peak[0] == 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_during(fn) -> tuple[float, float, float, object]:
    """(RSS before, peak while `fn` runs, after; in MB) and fn's result. Sampled every 5 ms."""
    before, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join(5)
    return before, max(peak[0], _rss_mb()), _rss_mb(), result


def _eight_large_pngs() -> dict:
    url = (
        "data:image/png;base64,"
        + base64.b64encode(_encoded(Image.new("RGB", (4096, 4096), (9, 99, 199)), "PNG")).decode()
    )
    return {"model": MODEL_NAME, "messages": _user("what is it?", *[url] * 8), "max_tokens": 2}


LARGE = dict(max_image_pixels=16_777_216, max_body_bytes=2_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["default", "raised"])
def test_eight_4096_pngs_stay_in_the_memory_budget(serving_model_dir, budget):
    """Eight 4096^2 PNGs (58 KB each as files, 50 MB each decoded) per request. With the default
    per-request budget the third image is refused before it is decoded. With the budget raised, four such
    requests at once are all decoded: two decodes at a time server-wide, each shrunk at once, and the
    memory goes back. Budget (docs/serving.md): 300 MB over the baseline at the peak, 100 MB after."""
    settings = dict(LARGE, max_request_pixels=8 * 16_777_216) if budget == "raised" else LARGE
    requests = 4 if budget == "raised" else 1
    engine, server = start_live_server(serving_model_dir, **settings)
    body = _eight_large_pngs()
    try:
        with server:
            url = server.url + "/v1/chat/completions"
            httpx.post(url, json={**body, "messages": _user("warm up", png_data_url())}, timeout=60)

            def send() -> list[httpx.Response]:
                with ThreadPoolExecutor(requests) as pool:
                    return list(pool.map(lambda _: httpx.post(url, json=body, timeout=120), range(requests)))

            before, peak, after, responses = _peak_rss_during(send)
    finally:
        engine.close()
    statuses = [r.status_code for r in responses]
    print(
        f"\n{budget}: RSS {before:.0f} MB before, {peak:.0f} MB peak, {after:.0f} MB after; HTTP {statuses}"
    )
    if budget == "default":
        error = _assert_error_shape(responses[0].json())
        assert statuses == [400] and error["code"] == "image_budget_exceeded"
        assert error["param"] == "messages[0].content[3]"  # the third image, refused before decoding
    else:
        assert statuses == [200] * requests
    assert peak - before < 300 and after - before < 100


# --- image URL rules (unit) -----------------------------------------------------------------------------
class _ImageHost(http.server.SimpleHTTPRequestHandler):
    """A loopback static file server that plays an image host. /redirect-allowed and /redirect-other
    redirect to files that exist and are reachable (so a redirect that is followed would succeed: only a
    refusal gives an error); /drip sends one byte every 0.2 s."""

    folder = "."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=self.folder, **kwargs)

    def do_GET(self):
        port = self.server.server_address[1]
        targets = {
            "/redirect-allowed": f"http://127.0.0.1:{port}/ok.png",
            "/redirect-other": f"http://localhost:{port}/ok.png",
        }
        if self.path in targets:
            self.send_response(302)
            self.send_header("Location", targets[self.path])
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up: that is the point
                pass
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host(tmp_path):
    """(folder it serves, port): ok.png (8x8) is there."""
    folder = tmp_path / "allowed"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "ok.png")
    handler = type("Handler", (_ImageHost,), {"folder": str(folder)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield folder, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _refusal_code(resolver: ImageResolver, url: str) -> str | None:
    with pytest.raises(APIError) as info:
        asyncio.run(resolver.resolve(url, "p"))
    assert info.value.status == 400, url
    return info.value.code


def test_image_resolver_allow_lists(tmp_path, image_host):
    allowed, port = image_host
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (allowed / "link.png").symlink_to(outside)
    resolver = ImageResolver(
        ServerSettings(
            allow_image_dirs=(str(allowed),), allow_image_hosts=("127.0.0.1", "allowed.test"),
            max_image_bytes=100_000,
        )
    )  # fmt: skip
    assert asyncio.run(resolver.resolve((allowed / "ok.png").as_uri(), "p")).size == (8, 8)
    assert asyncio.run(resolver.resolve(f"http://127.0.0.1:{port}/ok.png", "p")).size == (8, 8)
    # Each refusal has its own code: "refused" must not pass for "tried and failed" (or the reverse).
    expected = {
        outside.as_uri(): "image_url_not_allowed",  # outside the allowed folder
        (allowed / "link.png").as_uri(): "image_url_not_allowed",  # a symlink pointing outside
        f"file://{allowed}/../secret.png": "image_url_not_allowed",  # '..' escaping
        f"file://{allowed}/ok.png%00.txt": "image_url_not_allowed",  # a NUL byte (was a 500)
        f"http://localhost:{port}/ok.png": "image_url_not_allowed",  # reachable, but not on the list
        # Suffixes and prefixes of an allowed name are other hosts (refused before any lookup).
        "http://evil-allowed.test/ok.png": "image_url_not_allowed",
        "http://allowed.test.evil.net/ok.png": "image_url_not_allowed",
        "http://sub.allowed.test/ok.png": "image_url_not_allowed",
        # Redirects are not followed, not even to an allowed, reachable file.
        f"http://127.0.0.1:{port}/redirect-allowed": "image_fetch_failed",
        f"http://127.0.0.1:{port}/redirect-other": "image_fetch_failed",
        f"http://127.0.0.1:{port}/missing.png": "image_fetch_failed",
        "ftp://127.0.0.1/ok.png": "image_url_not_allowed",
    }
    assert {url: _refusal_code(resolver, url) for url in expected} == expected
    # Default settings: nothing but data URLs.
    strict = ImageResolver(ServerSettings())
    for url in [(allowed / "ok.png").as_uri(), f"http://127.0.0.1:{port}/ok.png"]:
        assert _refusal_code(strict, url) == "image_url_not_allowed"


def test_image_fetch_has_one_total_deadline(image_host):
    """A host that drips a byte every 0.2 s never trips a per-read timeout; the total deadline ends it."""
    _, port = image_host
    resolver = ImageResolver(ServerSettings(allow_image_hosts=("127.0.0.1",), image_fetch_timeout_s=1.0))
    started = time.monotonic()
    assert _refusal_code(resolver, f"http://127.0.0.1:{port}/drip") == "image_fetch_timeout"
    assert time.monotonic() - started < 3.0


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

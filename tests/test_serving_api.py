"""Serving, the OpenAI-compatible HTTP API: the `openai` client (and raw httpx) against a live uvicorn on
loopback. Models and health, text, image and streamed requests, server-side demonstrations, n > 1; every
refusal in OpenAI's error shape (bad requests, schema errors naming the field, malformed and oversize
bodies, internal errors kept generic); the queue and time limits, client disconnects freeing their rows,
and a bounded load test with concurrent clients."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from metalm.serving.request_types import ChatMessage, SamplingParams
from tests.serving_helpers import (
    MODEL_NAME,
    assert_error_shape,
    png_data_url,
    start_live_server,
    user_message,
    wait_until,
)

openai = pytest.importorskip("openai")


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
    text_only = client.chat.completions.create(
        model=MODEL_NAME, messages=user_message("what colour?"), max_tokens=4
    )
    with_image = client.chat.completions.create(
        model=MODEL_NAME, messages=user_message("what colour?", png_data_url()), max_tokens=4, temperature=0
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
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=user_message("what colour?"), max_tokens=2
    )
    attach_demonstrations(engine, demos, 1, "first", limit=engine.context_length)
    try:
        shown = client.chat.completions.create(
            model=MODEL_NAME, messages=user_message("what colour?"), max_tokens=2
        )
        expected = engine.prepare(engine.chat_parts([ChatMessage("user", "what colour?")]))
    finally:
        engine.demonstrations = None
    assert shown.usage.prompt_tokens == expected.num_tokens > plain.usage.prompt_tokens


def test_streamed_request(client, live):
    messages = user_message("tell me a story", png_data_url())
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
    body = {"model": MODEL_NAME, "messages": user_message("hi"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live[1] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_n_two(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=user_message("hi"), max_tokens=5, n=2, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 10


def _bad(kind: str):
    if kind == "bad_base64":
        return {"messages": user_message("x", "data:image/png;base64,@@not-base64@@")}
    if kind == "not_an_image":
        return {
            "messages": user_message(
                "x", "data:image/png;base64," + base64.b64encode(b"hello world").decode()
            )
        }
    if kind == "oversize_image":  # noise does not compress: > 200 kB
        return {"messages": user_message("x", png_data_url((300, 300), noise=True))}
    if kind == "too_many_pixels":  # a small file that decodes to 1.4 M pixels (decompression-bomb check)
        return {"messages": user_message("x", png_data_url((1200, 1200)))}
    if kind == "unknown_model":
        return {"model": "gpt-4o", "messages": user_message("x")}
    if kind == "file_url":
        return {"messages": user_message("x", "file:///etc/passwd")}
    if kind == "http_url":
        return {"messages": user_message("x", "http://example.com/cat.png")}
    if kind == "plain_path":
        return {"messages": user_message("x", "/etc/hosts")}
    if kind == "max_tokens":
        return {"messages": user_message("x"), "max_tokens": 100_000}
    if kind == "temperature":
        return {"messages": user_message("x"), "temperature": 7}
    if kind == "n":
        return {"messages": user_message("x"), "n": 50}
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


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_requests_with_openai_client(client, kind):
    status, code = BAD[kind]
    request = {"model": MODEL_NAME, "max_tokens": 4, **_bad(kind)}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == status
    error = assert_error_shape(info.value.response.json())
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
    "nine images": ({"messages": user_message("x", *["data:,"] * 9)}, (400, "too_many_images", "messages[0].content[9]")),
}  # fmt: skip


def test_schema_refusals_name_the_field(live):
    """Validation errors come out in OpenAI's shape, the field named by its path in the request (not by
    pydantic's union branches); empty unsupported options and zero penalties are accepted."""
    url = live[1] + "/v1/chat/completions"
    results = {}
    for name, (fields, _) in SCHEMA_REFUSALS.items():
        body = {"model": MODEL_NAME, "messages": user_message("x"), "max_tokens": 2, **fields}
        body = {k: v for k, v in body.items() if v is not None}
        r = httpx.post(
            url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30
        )
        error = assert_error_shape(r.json())
        results[name] = (r.status_code, error["code"], error["param"])
    assert results == {name: expected for name, (_, expected) in SCHEMA_REFUSALS.items()}
    accepted = {"tools": [], "logit_bias": {}, "presence_penalty": 0, "user": "someone", "top_p": 0}
    body = {"model": MODEL_NAME, "messages": user_message("x"), "max_tokens": 2, **accepted}
    assert httpx.post(url, json=body, timeout=30).status_code == 200


def test_malformed_and_oversize_bodies(live):
    url = live[1] + "/v1/chat/completions"
    r = httpx.post(
        url, content=b'{"model": "tiny-metalm", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert_error_shape(r.json())
    r = httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(url, content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert assert_error_shape(r.json())["code"] == "request_too_large"

    def chunked():  # no Content-Length: the endpoint counts what it reads
        for _ in range(12):
            yield b" " * 100_000

    r = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.get(live[1] + "/no/such/route")
    assert r.status_code == 404
    assert_error_shape(r.json())
    page = httpx.get(live[1] + "/")
    assert page.status_code == 200 and "metalm chat" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_server_error_is_generic(live, monkeypatch):
    engine, url = live

    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "chat_parts", boom)
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": user_message("x")})
    assert r.status_code == 500
    error = assert_error_shape(r.json())
    assert "secret" not in error["message"] and error["type"] == "server_error"


def test_queue_full_and_time_limit(serving_model_dir):
    """With the model busy: requests beyond the limit get 429; one that waits past its time limit gets 408."""
    engine, server = start_live_server(serving_model_dir, max_concurrent_requests=2, request_timeout_s=1.5)
    url = None
    results: dict[str, httpx.Response] = {}

    def post(name: str) -> None:
        body = {"model": MODEL_NAME, "messages": user_message(name), "max_tokens": 3}
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
                assert assert_error_shape(results["c"].json())["code"] == "rate_limit_exceeded"
                time.sleep(1.7)  # past b's time limit while it is still queued
            a.join(30)
            b.join(30)
            assert results["a"].status_code == 200  # it ran out of time after its first token
            assert results["a"].json()["usage"]["completion_tokens"] <= 1
            assert results["b"].status_code == 408
            assert assert_error_shape(results["b"].json())["code"] == "timeout"
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
        "messages": user_message("a long answer please"),
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
                    model=MODEL_NAME, messages=user_message(f"client {i}"), max_tokens=6
                )
                out.append(r.choices[0].message.content)
            elif k == 1:
                r = client.chat.completions.create(
                    model=MODEL_NAME, messages=user_message(f"image {i}", png_data_url(seed=i)), max_tokens=6
                )
                out.append(r.choices[0].message.content)
            else:
                stream = client.chat.completions.create(
                    model=MODEL_NAME, messages=user_message(f"stream {i}"), max_tokens=6, stream=True
                )
                out.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        return out

    with ThreadPoolExecutor(8) as pool:
        answers = [a for result in pool.map(session, range(8)) for a in result]
    assert len(answers) == 24 and all(isinstance(a, str) for a in answers)
    assert max(engine.runner.batch_sizes[before:]) > 1

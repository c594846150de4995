"""The vLLM engine (metalm.serving.vllm_backend): greedy answers equal metalm's own engine token for token,
streaming, cancellation, and the HTTP front on top of it.

Needs a vLLM environment (``make vllm`` makes ``.venv-vllm``, or ``METALM_VLLM_PYTHON``): skipped without
one. One vLLM start per module (a minute or more on a small CPU); the decoder's head size is 32 because
vLLM's CPU attention takes no smaller one.
"""

from __future__ import annotations

import threading

import openai
import pytest

from metalm.serving.request_types import SamplingParams
from metalm.serving.server import ServerSettings, create_app
from tests.conftest import TINY_LLAMA, build_tiny
from tests.serving_helpers import TEST_SETTINGS, LiveServer, png_data_url
from tests.vllm_pair import NEEDS_VLLM, QUESTIONS, engine_pair, greedy_pairs, image_requests

pytestmark = [pytest.mark.slow, NEEDS_VLLM]
VLLM_DECODER = {**TINY_LLAMA, "num_attention_heads": 2, "num_key_value_heads": 1}  # head size 32


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(metalm's own engine, the vLLM engine) on one tiny model."""
    model, processor = build_tiny(seed=1, decoder=VLLM_DECODER)
    yield from engine_pair(model, processor, "tiny", tmp_path_factory)


def test_greedy_answers_equal_metalm_engine_token_for_token(engines):
    """24 requests, 18 with an image, sent together."""
    for want, have in greedy_pairs(*engines, count=24, max_new_tokens=24, timeout=600):
        assert have.token_ids == want.token_ids
        assert (have.text, have.finish_reason) == (want.text, want.finish_reason)


def test_stop_strings_and_choices_are_metalm_rows(engines):
    own, vllm = engines
    prompt = own.prepare(own.chat_parts(image_requests(1)[0]))
    full = own.generate(prompt, SamplingParams(max_new_tokens=16, temperature=0.0)).completions[0].text
    stop = full.split()[2]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop=[stop], n=2)
    want = own.generate(prompt, params).completions
    have = vllm.generate(prompt, params).completions
    assert [(c.text, c.finish_reason) for c in have] == [(c.text, c.finish_reason) for c in want]
    assert have[0].finish_reason == "stop" and stop not in have[0].text


def test_streaming_yields_the_answer_piece_by_piece(engines):
    own, vllm = engines
    prompt = own.prepare(own.chat_parts(image_requests(2)[1]))
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    events = list(vllm.stream(prompt, params))
    pieces = [e.text for e in events if e.text]
    assert len(pieces) > 3
    assert events[-1].finish_reason == "length"
    assert "".join(pieces) == own.generate(prompt, params).completions[0].text


def test_cancellation_ends_the_answer_and_frees_vllm(engines):
    own, vllm = engines
    prompt = own.prepare(own.chat_parts(image_requests(3)[2]))
    job = vllm.submit(prompt, SamplingParams(max_new_tokens=200, temperature=0.0))
    for event in job.events(timeout=600):
        if event.text:
            job.cancel()
    completion = job.result(timeout=60).completions[0]
    assert completion.finish_reason == "cancelled"
    assert len(completion.token_ids) < 200
    after = vllm.generate(prompt, SamplingParams(max_new_tokens=5, temperature=0.0)).completions[0]
    assert len(after.token_ids) == 5  # the server goes on serving


def test_http_front_streams_from_vllm_and_cancels_on_disconnect(engines):
    own, vllm = engines
    with LiveServer(create_app(vllm, ServerSettings(**TEST_SETTINGS))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        content = [
            {"type": "text", "text": QUESTIONS[0]},
            {"type": "image_url", "image_url": {"url": png_data_url()}},
        ]
        messages = [{"role": "user", "content": content}]
        stream = client.chat.completions.create(
            model=TEST_SETTINGS["model_name"], messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        plain = client.chat.completions.create(
            model=TEST_SETTINGS["model_name"], messages=messages, max_tokens=12, temperature=0
        )
        assert text == plain.choices[0].message.content and text
        # A client that leaves mid-stream: its job is cancelled and its slot freed.
        stream = client.chat.completions.create(
            model=TEST_SETTINGS["model_name"], messages=messages, max_tokens=64, temperature=0, stream=True
        )
        next(iter(stream))
        stream.close()
        done = threading.Event()
        for _ in range(600):
            if vllm.pending == 0:
                done.set()
                break
            done.wait(0.1)
        assert done.is_set(), "the abandoned request was not released"

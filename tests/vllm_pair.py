"""What the vLLM equality tests share: the skip when no vLLM environment exists, the requests (three in four
with an image), and metalm's own engine beside a vLLM engine on the same model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from metalm.serving.engine import Engine
from metalm.serving.request_types import ChatMessage, SamplingParams
from metalm.serving.vllm_process import VLLMSettings, find_vllm_python

NEEDS_VLLM = pytest.mark.skipif(
    find_vllm_python() is None,
    reason="no vLLM environment: `make vllm` (creates .venv-vllm) or set METALM_VLLM_PYTHON",
)
QUESTIONS = ["what colour is the circle", "how many shapes are there", "describe the picture", "is it red"]


def image_requests(count: int) -> list[list[ChatMessage]]:
    """`count` one-message chats, each a numbered question, every one but each fourth with an image."""
    out = []
    for i in range(count):
        images = [Image.new("RGB", (32, 32), ((41 * i) % 256, 90, 200))] if i % 4 != 3 else []
        out.append([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)] + f" {i}", images)])
    return out


def engine_pair(model, processor, name: str, tmp_path_factory) -> Iterator[tuple[Engine, Engine]]:
    """(metalm's own engine, the vLLM engine) on one model; both closed afterwards (a fixture's body)."""
    own = Engine(model, processor, device="cpu", name=name)
    settings = VLLMSettings(threads=1, cache_dir=str(tmp_path_factory.mktemp("vllm_cache")))
    vllm = Engine(model, processor, device="cpu", name=name, vllm=settings, max_batch_size=8)
    yield own, vllm
    vllm.close()
    own.close()


def greedy_pairs(own: Engine, vllm: Engine, count: int, max_new_tokens: int, timeout: float) -> list[tuple]:
    """(metalm's completion, vLLM's completion) for each of `count` image requests, greedy; vLLM gets them all
    at once, so it batches them."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts = [own.prepare(own.chat_parts(messages)) for messages in image_requests(count)]
    expected = [own.generate(p, params).completions[0] for p in prompts]
    jobs = [vllm.submit(p, params) for p in prompts]
    return list(zip(expected, [job.result(timeout=timeout).completions[0] for job in jobs]))

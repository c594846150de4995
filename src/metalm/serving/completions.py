"""Answering one chat completions request: resolve its images, lay out and submit the prompt to the
engine's batch worker, then wait for the answer (one JSON body) or relay it as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from metalm.data.processor import InputError
from metalm.serving.audio_intake import AudioIntake
from metalm.serving.errors import refusal_for, refuse_over_limit, request_timeout
from metalm.serving.jobs import Job
from metalm.serving.request_types import ChatMessage, QueueFull, SamplingParams, StreamEvent
from metalm.serving.resolver import ImageResolver
from metalm.serving.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Message,
    Usage,
)
from metalm.serving.state import InFlightSlot, ServerState

__all__ = ["answer", "to_chat_messages"]

logger = logging.getLogger("metalm.serving")

_GRACE_S = 5.0  # beyond the request's deadline: the worker enforces the deadline itself


async def to_chat_messages(
    messages: list[Message], resolver: ImageResolver, max_images: int, audio: AudioIntake
) -> list[ChatMessage]:
    """The engine's chat messages, images and speech decoded. All images share one pixel budget; too many
    images (or clips), and clips the model cannot hear, are refused before any is decoded."""
    images = [(i, j, url) for i, msg in enumerate(messages) for j, url in msg.image_urls()]
    refuse_over_limit(images, max_images, "images", "too_many_images")
    audio.check(messages)
    budget = resolver.new_budget()
    decoded: list[list[Any]] = [[] for _ in messages]
    for i, j, url in images:  # in order: the budget names the image that would cross it
        decoded[i].append(await resolver.resolve(url, f"messages[{i}].content[{j}]", budget))
    clips = await audio.decode(messages)
    return [
        ChatMessage(role=m.role, text=m.text(), images=imgs, audio=heard)
        for m, imgs, heard in zip(messages, decoded, clips)
    ]


async def _submit(
    state: ServerState, messages: list[ChatMessage], params: SamplingParams, encode: bool | None,
    deadline: float,
) -> tuple[Job, asyncio.Queue]:  # fmt: skip
    """The queued job and the asyncio queue its events arrive on (from the engine's worker thread)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_event(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown); nothing left to deliver to
            pass

    def prepare_and_submit() -> Job:  # tokenizing and image preprocessing: off the event loop
        prompt = state.engine.prepare(state.engine.chat_parts(messages, encode=encode, seed=params.seed))
        state.check_prompt_length(prompt)
        return state.engine.submit(prompt, params, deadline=deadline, on_event=on_event)

    try:
        return await run_in_threadpool(prepare_and_submit), events
    except (InputError, QueueFull) as err:
        raise refusal_for(err) from None


async def answer(
    state: ServerState, request: Request, req: ChatCompletionRequest, deadline: float, slot: InFlightSlot
) -> Response:
    """The answer to a validated request. A streamed answer takes over `slot` and releases it when it
    ends; otherwise the caller releases it."""
    started = time.monotonic()
    messages = await to_chat_messages(req.messages, state.resolver, state.settings.max_images, state.audio)
    req.messages = []  # the body's strings (base64 images, long texts) are not needed any more
    params = req.sampling_params(state.settings.default_max_tokens)
    job, events = await _submit(state, messages, params, req.metalm_encode, deadline)
    del messages  # the job holds the prompt (tokens, encoder inputs); the decoded images can go
    ids = _AnswerIds(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), state.model_name)
    remaining = max(0.1, deadline - time.monotonic()) + _GRACE_S
    if req.stream:
        first = await _first_event(job, events, remaining)
        chunks = _stream(job, first, events, ids, req.include_usage, deadline + _GRACE_S)
        return _EventStream(chunks, job, slot)
    if not await _wait_for_end(job, events, request, remaining):
        logger.info("%s: client went away", ids.id)
        return JSONResponse({}, status_code=499)
    if job.error is not None:
        raise refusal_for(job.error)
    result = job.result(timeout=0)
    logger.info(
        "%s: %d prompt + %d completion tokens in %.2f s", ids.id, result.prompt_tokens,
        result.completion_tokens, time.monotonic() - started,
    )  # fmt: skip
    choices = [
        Choice(
            index=i, message=AssistantMessage(content=c.text), finish_reason=_finish_reason(c.finish_reason)
        )
        for i, c in enumerate(result.completions)
    ]
    usage = Usage.of(result.prompt_tokens, result.completion_tokens)
    return JSONResponse(ChatCompletion(**ids.fields(), choices=choices, usage=usage).model_dump())


@dataclass(frozen=True)
class _AnswerIds:
    """What every body or chunk of one answer repeats."""

    id: str
    created: int
    model: str

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _wait_for_end(job: Job, events: asyncio.Queue, request: Request, seconds: float) -> bool:
    """Waits for the job's end (True), or for the client to go away (False: the job is cancelled)."""
    give_up = time.monotonic() + seconds
    next_check = time.monotonic() + 0.5
    while True:
        try:
            if Job.is_end(await asyncio.wait_for(events.get(), 0.5)):
                return True
        except TimeoutError:
            if time.monotonic() > give_up:
                job.cancel()
                raise request_timeout() from None
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 0.5
            if await request.is_disconnected():
                job.cancel()  # nobody is waiting for the answer: free the batch row
                return False


async def _first_event(job: Job, events: asyncio.Queue, seconds: float) -> Any:
    """The first event of a streamed job. Waiting for it before answering means a job that fails before
    any output (timed out in the queue, bad input) still gets a proper error status, not a 200 stream."""
    try:
        first = await asyncio.wait_for(events.get(), seconds)
    except TimeoutError:
        job.cancel()
        raise request_timeout() from None
    if Job.is_end(first) and job.error is not None:
        raise refusal_for(job.error)
    return first


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


class _EventStream(StreamingResponse):
    """A streamed answer that frees its batch row and in-flight slot however the response ends: also when
    the client leaves before the first chunk, when the chunk generator never starts (so its own cleanup
    never runs)."""

    def __init__(self, chunks: AsyncIterator[bytes], job: Job, slot: InFlightSlot) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(chunks, media_type="text/event-stream", headers=headers)
        self._job, self._slot = job, slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._job.done:
                self._job.cancel()  # the client went away: free the batch row
            self._slot.release()


async def _stream(
    job: Job, first: Any, events: asyncio.Queue, ids: _AnswerIds, include_usage: bool, hard_deadline: float
) -> AsyncIterator[bytes]:  # fmt: skip
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        body = ChatCompletionChunk(**ids.fields(), choices=choices, usage=usage)
        return _sse(body.model_dump(exclude=None if include_usage else {"usage"}))

    yield chunk(
        [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(job.params.n)]
    )
    completion_tokens = 0
    async for ev in _events_until_end(job, first, events, hard_deadline):
        if ev.finish_reason is not None:
            completion_tokens += len(job.completions[ev.index].token_ids)
            finish = _finish_reason(ev.finish_reason)
            yield chunk([ChunkChoice(index=ev.index, delta=Delta(), finish_reason=finish)])
        elif ev.text:
            yield chunk([ChunkChoice(index=ev.index, delta=Delta(content=ev.text))])
    if job.error is not None:  # the status line is sent: the error goes in the stream
        logger.info("%s: stream ended by %s", ids.id, type(job.error).__name__)
        yield _sse(refusal_for(job.error).body())
    elif include_usage:
        yield chunk([], Usage.of(job.prompt.num_tokens, completion_tokens))
    yield _sse("[DONE]")


async def _events_until_end(
    job: Job, first: Any, events: asyncio.Queue, hard_deadline: float
) -> AsyncIterator[StreamEvent]:
    """The job's events, starting with `first`, until its end or the hard deadline (then it is cancelled)."""
    item = first
    while not Job.is_end(item):
        yield item
        try:
            item = await asyncio.wait_for(events.get(), max(0.1, hard_deadline - time.monotonic()))
        except TimeoutError:
            job.cancel()
            return

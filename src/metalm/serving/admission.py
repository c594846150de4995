"""Admitting a chat request cheaply: the body is counted while it arrives, bounded before it is parsed,
parsed off the event loop a few at a time, and its prompt text bounded before any tokenizer runs.

Memory per in-flight request (docs/serving.md, "Memory bounds"): the raw body (``max_body_bytes``) while
it is read; while it is parsed, its strings (at most 4 bytes a character, so at most 4 x the body) and at
most ``max_json_values`` containers and values (~100 bytes each); once its prompt is built, the parsed
body is dropped and the request holds its prompt (tokens and encoder inputs) alone."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from metalm.data.images import release_memory
from metalm.serving.errors import APIError, validation_refusal
from metalm.serving.http_guard import parse_json
from metalm.serving.schemas import ChatCompletionRequest, Message
from metalm.serving.settings import ServerSettings

__all__ = ["BodyReader", "MemoryTrimmer", "PromptTextBound", "max_token_chars", "structural_count"]

logger = logging.getLogger("metalm.serving")

_STRUCTURAL = (b"{", b"[", b",", b":")


def structural_count(data: bytes | bytearray) -> int:
    """An upper bound on the containers and values `data` parses to: its brackets, commas and colons (some
    may lie inside strings; none lie in base64). A few C-speed scans, no parsing."""
    return sum(data.count(c) for c in _STRUCTURAL)


class BodyReader:
    """Reads chat request bodies under the server's bounds (module docstring)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        # A thread semaphore (parses run in worker threads): it bounds the parse transients alive at once.
        self._parses = threading.BoundedSemaphore(max(1, settings.max_concurrent_parses))

    async def read(self, request: Request, model: type[ChatCompletionRequest]) -> ChatCompletionRequest:
        """The validated request; the raw bytes and the parsed JSON are gone when it returns."""
        limit = self.settings.max_body_bytes
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise APIError(
                        413,
                        f"the request body is over the limit of {limit:,} bytes",
                        code="request_too_large",
                    )
        except ClientDisconnect:  # the client left mid-upload: nobody to answer, nothing to log loudly
            raise APIError(
                499, "the client went away during the upload", code="client_disconnected"
            ) from None
        return await run_in_threadpool(self._parse, [data], model)

    def _parse(self, holder: list[bytearray], model: type[ChatCompletionRequest]) -> ChatCompletionRequest:
        with self._parses:
            data = holder.pop()
            count, most = structural_count(data), self.settings.max_json_values
            if count > most:
                raise APIError(
                    400, f"the request body has {count:,} brackets, commas and colons, over the limit of "
                    f"{most:,}; no chat request needs that many", code="too_many_json_values",
                )  # fmt: skip
            body = parse_json(data)
            del data  # the raw bytes go before validation
            try:
                return model.model_validate(body)
            except ValidationError as err:
                refusal = validation_refusal(err, body)
            del body  # not kept alive by the refusal's traceback
            raise refusal


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` stands for: the longest vocabulary entry (its
    "##", "Ġ" or "▁" markers counted, so an overestimate), at least 1."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


class PromptTextBound:
    """The most characters of prompt text a request may bring: whatever tokenizes into ``limit`` tokens
    or fewer has at most ``limit * (chars per token + 1)`` characters (the +1: a space between tokens).
    Checked before any tokenizer runs, so a long text costs a length, not a tokenization."""

    def __init__(self, limit_tokens: int | None, chars_per_token: int) -> None:
        self.limit_tokens = limit_tokens
        self.max_chars = None if limit_tokens is None else limit_tokens * (chars_per_token + 1)

    def check(self, messages: Sequence[Message], history: str) -> None:
        if self.max_chars is None:
            return
        chars = prompt_chars(messages, history)
        if chars > self.max_chars:
            raise APIError(
                400, f"the prompt's text is {chars:,} characters long; the model's context of "
                f"{self.limit_tokens:,} tokens cannot hold more than {self.max_chars:,}",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip


def prompt_chars(messages: Sequence[Message], history: str) -> int:
    """Characters of the text that reaches the prompt: system turns, and the last user turn (``latest``
    history) or every turn (``demonstrations``); see `metalm.data.layouts.chat_layout_parts`."""
    system = [m for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role not in ("system", "developer")]
    if history == "latest":
        turns = turns[-1:]
    return sum(_text_chars(m) for m in [*system, *turns])


def _text_chars(message: Message) -> int:
    if isinstance(message.content, str):
        return len(message.content)
    return sum(len(getattr(part, "text", "")) for part in message.content or ())


class MemoryTrimmer:
    """Hands freed heap memory back to the system shortly after requests end: glibc keeps the arenas a
    12 MB body was parsed in, or a large image decoded in, so without it RSS only ever grows (the issue saw
    538 MB -> 4.8 GB). At most one trim per period, from a background task, once the requests' objects
    (and any exception holding them) are gone; a trim takes milliseconds."""

    def __init__(self) -> None:
        self.dirty = False

    def request_ended(self) -> None:
        self.dirty = True

    async def run(self, period_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(period_s)
            if self.dirty:
                self.dirty = False
                await run_in_threadpool(release_memory)

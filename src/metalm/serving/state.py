"""What the server's endpoints share: the engine, the settings, the image resolver and the in-flight
limiter (`ServerState`, kept on ``app.state.metalm``)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from metalm.serving.admission import BodyReader, MemoryTrimmer, PromptTextBound, max_token_chars
from metalm.serving.audio_intake import AudioIntake
from metalm.serving.engine import Engine
from metalm.serving.errors import APIError
from metalm.serving.page import ChatPage
from metalm.serving.request_types import Prompt
from metalm.serving.resolver import ImageResolver
from metalm.serving.schemas import ChatCompletionRequest, bounded_request_model
from metalm.serving.settings import ServerSettings

__all__ = ["InFlightLimiter", "InFlightSlot", "ServerState"]


class InFlightLimiter:
    """The one gate on load: requests in flight, from a valid body to the answer's last byte (a stream's
    included). Past the limit they get 429. Used from the event loop's thread only, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def acquire(self) -> InFlightSlot:
        if self.count >= self.limit:
            raise APIError(
                429, f"the server is busy ({self.count} requests in flight); retry later",
                type="rate_limit_error", code="rate_limit_exceeded",
            )  # fmt: skip
        self.count += 1
        return InFlightSlot(self)


class InFlightSlot:
    """One request's place in the limiter; released once, however often `release` is called."""

    def __init__(self, limiter: InFlightLimiter) -> None:
        self._limiter, self._held = limiter, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.count -= 1


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    model_name: str
    request_model: type[ChatCompletionRequest]  # with the settings' limits
    resolver: ImageResolver
    audio: AudioIntake
    bodies: BodyReader
    prompt_text: PromptTextBound
    trimmer: MemoryTrimmer
    limiter: InFlightLimiter
    page: ChatPage
    created: int  # the models' "created" time

    @classmethod
    def build(cls, engine: Engine, settings: ServerSettings) -> ServerState:
        model_name = settings.model_name or engine.name
        # The limiter is the server's gate; the engine's own queue limit must not cut in below it.
        engine.scheduler.max_pending = max(engine.scheduler.max_pending, settings.max_concurrent_requests)
        return cls(
            engine=engine,
            settings=settings,
            model_name=model_name,
            request_model=bounded_request_model(settings, model_name),
            resolver=ImageResolver(settings, target_size=engine.image_size),
            audio=AudioIntake(settings, engine.max_audio_seconds),
            bodies=BodyReader(settings),
            prompt_text=PromptTextBound(
                settings.max_prompt_tokens or engine.context_length,
                max_token_chars(engine.processor.tokenizer),
            ),
            trimmer=MemoryTrimmer(),
            limiter=InFlightLimiter(settings.max_concurrent_requests),
            page=ChatPage.load(),
            created=int(time.time()),
        )

    def check_api_key(self, authorization: str) -> None:
        if self.settings.api_key is None:
            return
        expected = f"Bearer {self.settings.api_key}".encode()
        # Constant time: the key cannot be guessed byte by byte from response times.
        if not hmac.compare_digest(authorization.encode("latin-1"), expected):
            raise APIError(
                401, "missing or wrong API key", type="authentication_error", code="invalid_api_key"
            )

    def check_prompt_length(self, prompt: Prompt) -> None:
        limit = self.settings.max_prompt_tokens or self.engine.context_length
        if limit is not None and prompt.num_tokens > limit:
            raise APIError(
                400, f"the prompt takes {prompt.num_tokens} tokens, over the limit of {limit}",
                param="messages", code="context_length_exceeded",
            )  # fmt: skip

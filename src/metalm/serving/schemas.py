"""The HTTP API's bodies as pydantic models: what a chat completions request may hold (the server's
limits are validators: `bounded_request_model`) and what the answers look like. FastAPI publishes them
at ``/openapi.json``; `metalm.serving.errors` turns their validation errors into OpenAI-shaped 400s."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StrictStr, create_model, model_serializer
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from metalm.serving.request_types import SamplingParams
from metalm.serving.settings import ServerSettings

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ErrorResponse",
    "Health",
    "ModelCard",
    "ModelList",
    "bounded_request_model",
]

# --- requests ------------------------------------------------------------------------------------------
# Roles as OpenAI names them; the engine maps them to its layouts ("developer" is a system turn) and
# decides which may carry images.
Role = Literal["system", "developer", "user", "assistant"]
# Strict scalars: JSON "1" is not a number, true is not an integer, and NaN/Infinity are refused.
Number = Annotated[float | None, Field(strict=True, allow_inf_nan=False)]
Integer = Annotated[int | None, Field(strict=True)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    url: StrictStr  # data:, or http(s)/file where the server allows it (`ImageResolver`)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    data: StrictStr  # base64 of the file's bytes
    format: StrictStr  # "wav" or "mp3", as OpenAI's API takes them


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    role: Role
    content: StrictStr | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content or () if isinstance(p, TextPart) and p.text)

    def image_urls(self) -> list[tuple[int, str]]:
        """(index of the content part, URL) of each image."""
        parts = self.content if isinstance(self.content, list) else []
        return [(j, p.image_url.url) for j, p in enumerate(parts) if isinstance(p, ImagePart)]

    def audio_clips(self) -> list[tuple[int, InputAudio]]:
        """(index of the content part, its input_audio) of each speech clip."""
        parts = self.content if isinstance(self.content, list) else []
        return [(j, p.input_audio) for j, p in enumerate(parts) if isinstance(p, AudioPart)]


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


def _unsupported(value: Any) -> Any:
    # Refused rather than ignored: a client relying on them would get silently wrong answers.
    if value:
        raise PydanticCustomError("unsupported_parameter", "not supported by this server")
    return value


# OpenAI parameters this server does not implement: accepted only when empty / zero, not in the schema.
Unsupported = Annotated[SkipJsonSchema[Any], AfterValidator(_unsupported)]
Penalty = Annotated[SkipJsonSchema[Number], Field(ge=-2.0, le=2.0), AfterValidator(_unsupported)]


class ChatCompletionRequest(BaseModel):
    """A chat completions request in OpenAI's shape. Unknown fields are ignored (as OpenAI's clients
    send some this server has no use for); `bounded_request_model` adds the server's limits."""

    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[Integer, Field(ge=1)] = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[Number, Field(ge=0.0, le=1.0)] = None
    n: Annotated[Integer, Field(ge=1)] = None
    seed: Annotated[Integer, Field(ge=-(2**63), le=2**63 - 1)] = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    metalm_encode: StrictBool | None = Field(
        None, description="metalm extension: read the prompt with the text encoder (null: when it fits)"
    )
    tools: Unsupported = None
    functions: Unsupported = None
    tool_choice: Unsupported = None
    response_format: Unsupported = None
    logit_bias: Unsupported = None
    audio: Unsupported = None
    logprobs: Unsupported = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0.0:
            top_p, temperature = 1.0, 0.0  # "only the most likely token": greedy
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=max_tokens or default_max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            n=self.n or 1,
            seed=self.seed,
        )


def bounded_request_model(settings: ServerSettings, model_name: str) -> type[ChatCompletionRequest]:
    """`ChatCompletionRequest` with this server's limits and model name: one declaration that both
    validates requests and is published as their schema."""

    def served(name: str) -> str:
        if name != model_name:
            raise PydanticCustomError(
                "model_not_found", "the model '{name}' does not exist; this server serves '{served}'",
                {"name": name, "served": model_name},
            )  # fmt: skip
        return name

    max_tokens = Annotated[Integer, Field(ge=1, le=settings.max_tokens_limit)]
    stop = Annotated[StrictStr, Field(max_length=settings.max_stop_chars)]
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        model=(
            Annotated[StrictStr, AfterValidator(served), Field(json_schema_extra={"enum": [model_name]})],
            ...,
        ),
        messages=(Annotated[list[Message], Field(min_length=1, max_length=settings.max_messages)], ...),
        max_tokens=(max_tokens, None),
        max_completion_tokens=(max_tokens, None),
        n=(Annotated[Integer, Field(ge=1, le=settings.max_n)], None),
        stop=(stop | Annotated[list[stop], Field(max_length=settings.max_stop)] | None, None),
    )


# --- answers -------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _AnswerHead(BaseModel):
    """What every body or chunk of one answer repeats."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: None = None


class ChatCompletion(_AnswerHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: the closing chunk's delta is {}.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_AnswerHead):
    """One server-sent event of a streamed answer. ``usage`` is present (null but in the last chunk)
    only when the request asked for it with ``stream_options.include_usage``."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "metalm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    in_flight: int
    pending: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail

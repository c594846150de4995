"""The HTTP endpoints, as one router. Each handler reads the shared `ServerState` from the app; the
chat completions flow itself lives in `metalm.serving.completions`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from metalm.serving.completions import answer
from metalm.serving.errors import APIError
from metalm.serving.schemas import ChatCompletion, ErrorResponse, Health, ModelCard, ModelList
from metalm.serving.state import ServerState

__all__ = ["CHAT_PATH", "router"]

CHAT_PATH = "/v1/chat/completions"


def get_state(request: Request) -> ServerState:
    return request.app.state.metalm


State = Annotated[ServerState, Depends(get_state)]


def require_api_key(request: Request, state: State) -> None:
    state.check_api_key(request.headers.get("authorization", ""))


router = APIRouter()
keyed = [Depends(require_api_key)]
_REFUSALS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": "refused"}
    for status in (400, 401, 403, 404, 408, 413, 415, 429)
}


@router.get("/", include_in_schema=False)
async def index(state: State) -> HTMLResponse:
    return HTMLResponse(state.page.html, headers=state.page.headers)


@router.get("/health")
async def health(state: State) -> Health:
    return Health(model=state.model_name, in_flight=state.limiter.count, pending=state.engine.pending)


@router.get("/v1/models", dependencies=keyed, responses=_REFUSALS)
async def models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])


@router.get("/v1/models/{name:path}", dependencies=keyed, responses=_REFUSALS)
async def model_info(name: str, state: State) -> ModelCard:
    if name != state.model_name:
        raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
    return ModelCard(id=state.model_name, created=state.created)


@router.post(
    CHAT_PATH,
    dependencies=keyed,
    response_model=None,
    responses={
        200: {
            "model": ChatCompletion,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "description": "the answer; with `stream: true`, server-sent `chat.completion.chunk` events",
        },
        **_REFUSALS,
    },
)
async def chat_completions(request: Request, state: State) -> Response:
    # The body is read and validated here rather than by FastAPI: a place in flight is taken first (a
    # 429 costs nothing), its size is counted as it arrives, it is bounded before it is parsed and
    # parsed off the event loop (`BodyReader`), and the prompt's text is bounded before any tokenizer
    # runs. Its schema is published by `publish_request_schema`.
    deadline = time.monotonic() + state.settings.request_timeout_s
    slot = state.limiter.acquire()
    try:
        req = await state.bodies.read(request, state.request_model)
        state.prompt_text.check(req.messages, state.engine.chat_history)
        stream = req.stream
        response = await answer(state, request, req, deadline, slot)
    except BaseException:
        slot.release()
        raise
    finally:
        state.trimmer.request_ended()
    if not stream:
        slot.release()
    return response

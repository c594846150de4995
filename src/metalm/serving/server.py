"""An OpenAI-compatible HTTP server for a MetaLM (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` content parts, ``stream: true`` as
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and a chat page at
``/``. Requests are batched by the engine's worker (:mod:`metalm.serving.scheduler`).

Safety defaults (see docs/serving.md): loopback bind; only loopback ``Host`` names (DNS rebinding) and
same-origin (or allowed) ``Origin``s; POST bodies must be ``application/json`` (no cross-site "simple"
requests); images only from ``data:`` URLs unless hosts (``http(s)``, one total fetch deadline) or folders
(``file://``) are allowed explicitly; limits on body size, image bytes and pixels (decompression bombs
refused), pixels decoded per request and decodes at once, images per request, prompt tokens,
``max_tokens``, ``n``, stop strings, requests in flight (429) and time per request. Every refusal is a 4xx
JSON body in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; unexpected failures
return a generic 500 and the trace goes to the log only. The request and answer schemas are published at
``/openapi.json``.

The parts: `settings` (limits), `schemas` (bodies), `errors` (the error shape), `http_guard` (checks
before routing, safe JSON reading), `resolver` (images), `state` (what endpoints share, the in-flight
gate), `routes` (endpoints), `completions` (answering a request).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from metalm.serving.engine import Engine
from metalm.serving.errors import APIError, install_error_handlers
from metalm.serving.http_guard import HTTPGuard
from metalm.serving.resolver import ImageResolver
from metalm.serving.routes import CHAT_PATH, router
from metalm.serving.settings import ServerSettings
from metalm.serving.state import ServerState

__all__ = ["APIError", "ImageResolver", "ServerSettings", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.metalm.engine.start()
    trimmer = asyncio.create_task(app.state.metalm.trimmer.run())
    try:
        yield
    finally:
        trimmer.cancel()


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `settings`. The engine's batch worker starts with the app;
    the caller owns the engine (and closes it)."""
    state = ServerState.build(engine, settings or ServerSettings())
    app = FastAPI(
        title="metalm", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=_lifespan
    )
    app.state.metalm = state
    app.add_middleware(HTTPGuard, settings=state.settings)
    install_error_handlers(app)
    app.include_router(router)
    publish_request_schema(app, CHAT_PATH, state.request_model)
    return app


def publish_request_schema(app: FastAPI, path: str, model: type[BaseModel]) -> None:
    """Documents `model` in ``/openapi.json`` as the JSON body of ``POST path``, whose handler validates
    the body itself."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()  # cached by FastAPI in app.openapi_schema: amended once
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref}},
            }
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

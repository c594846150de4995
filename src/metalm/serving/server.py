"""An OpenAI-compatible HTTP server for a MetaLM (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` content parts, ``stream: true`` as
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and a chat page at
``/``. Requests are batched dynamically by the :class:`~metalm.serving.engine.Engine` worker.

Safety defaults (see docs/serving.md): loopback bind; only loopback ``Host`` names (DNS rebinding) and
same-origin (or allowed) ``Origin``s; POST bodies must be ``application/json`` (no cross-site "simple"
requests); images only from ``data:`` URLs unless hosts (``http(s)``, one total fetch deadline) or folders
(``file://``) are allowed explicitly; limits on body size, image bytes and pixels (decompression bombs
refused), pixels decoded per request and decodes at once, images per request, prompt tokens,
``max_tokens``, ``n``, stop strings, requests in flight (429) and time per request. Every refusal is a 4xx
JSON body in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``; unexpected failures
return a generic 500 and the trace goes to the log only. The request schema is published at
``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalm.data.images import DecodeBudget, ImageError, load_image
from metalm.data.processor import InputError
from metalm.serving.engine import (
    ChatMessage,
    Engine,
    Job,
    JobTimeout,
    QueueFull,
    SamplingParams,
    StreamEvent,
)

__all__ = ["APIError", "ServerSettings", "create_app"]

logger = logging.getLogger("metalm.serving")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    """Limits and safety switches of the server (defaults are the safe ones)."""

    model_name: str | None = None  # the id clients must send; default: the engine's name
    max_body_bytes: int = 12_000_000  # a base64 data URL is 4/3 of the image's bytes
    max_image_bytes: int = 8_000_000
    max_image_pixels: int = 16_777_216  # 4096 x 4096; checked from the header, before decoding
    max_request_pixels: int = 33_554_432  # decoded by all images of one request together
    max_concurrent_decodes: int = 2  # full-size decodes at once, server-wide (each may take ~100 MB)
    max_images: int = 8  # per request
    max_messages: int = 128
    max_prompt_tokens: int | None = None  # default: the model's context length
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_n: int = 4
    max_stop: int = 4
    max_stop_chars: int = 64
    max_concurrent_requests: int = 32  # in flight (queued + running); more get 429
    request_timeout_s: float = 120.0  # queue wait + generation; answers are cut when it passes
    allow_image_hosts: tuple[str, ...] = ()  # hostnames whose http(s) image URLs may be fetched
    allow_image_dirs: tuple[str, ...] = ()  # folders whose files file:// image URLs may read
    image_fetch_timeout_s: float = 10.0  # one deadline for the whole fetch (connect + every byte)
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    # Host header names the server answers to (DNS rebinding); "*" = any. Loopback names by default.
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    # Origins (scheme://host[:port]) besides the server's own whose browsers may call the API; "*" = any.
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts_lower: tuple[str, ...] = field(init=False, repr=False, default=())
    allowed_dirs_resolved: tuple[Path, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.allowed_hosts_lower = tuple(
            h.strip().lower().rstrip(".") for h in self.allow_image_hosts if h.strip()
        )
        self.allowed_hosts = tuple(_host_name(h) for h in self.allowed_hosts if h.strip())
        self.allowed_origins = tuple(o.strip().lower().rstrip("/") for o in self.allowed_origins if o.strip())
        self.allowed_dirs_resolved = tuple(Path(d).expanduser().resolve() for d in self.allow_image_dirs)
        for d in self.allowed_dirs_resolved:
            if not d.is_dir():
                raise ValueError(f"--allow-image-dirs: {d} is not a folder")


class APIError(Exception):
    """A refusal with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --- request parsing ----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    encode: bool | None


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    # (math.isfinite would raise OverflowError on a 400-digit integer; ints are finite anyway.)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"'{key}' must be a number", param=key, code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a finite number", param=key, code="invalid_value")
    if not lo <= value <= hi:
        raise APIError(
            400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key, code="invalid_value"
        )
    return float(value)


def _integer(
    body: dict, key: str, default: int | None, lo: int, hi: int, *, code: str = "invalid_value"
) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key, code=code)
    return value


def parse_chat_request(body: Any, settings: ServerSettings, model_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
    if model != model_name:
        raise APIError(
            404, f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
            code="model_not_found",
        )  # fmt: skip
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages", code="invalid_value")
    if len(messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per request", param="messages")
    for key in ("tools", "functions", "tool_choice", "response_format", "logit_bias", "audio"):
        if body.get(key):
            raise APIError(
                400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
            )
    if body.get("logprobs"):
        raise APIError(
            400, "'logprobs' is not supported by this server", param="logprobs", code="unsupported_parameter"
        )
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise APIError(
                400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
            )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, settings.default_max_tokens, 1, settings.max_tokens_limit)
    n = _integer(body, "n", 1, 1, settings.max_n)
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        top_p, temperature = 1.0, 0.0  # "only the most likely token": greedy
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > settings.max_stop or any(len(s) > settings.max_stop_chars for s in stop):
        raise APIError(
            400, f"at most {settings.max_stop} stop strings of up to {settings.max_stop_chars} characters",
            param="stop", code="invalid_value",
        )  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    encode = body.get("metalm_encode")
    if encode is not None and not isinstance(encode, bool):
        raise APIError(
            400, "'metalm_encode' must be a boolean or null", param="metalm_encode", code="invalid_type"
        )
    params = SamplingParams(
        max_new_tokens=int(max_tokens or 1),
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        n=int(n or 1),
        seed=seed,
    )
    return ChatRequest(messages, params, stream, bool(options.get("include_usage")), encode)


_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]*$")


class ImageResolver:
    """Turns an `image_url` into a PIL image under the server's rules: data URLs always; http(s) only for
    allowed hosts; file URLs only inside allowed folders; anything else is refused. Images are decoded
    straight to about twice ``target_size`` (the encoder's input side), at most
    ``settings.max_concurrent_decodes`` at a time, each charged to its request's `DecodeBudget`."""

    def __init__(self, settings: ServerSettings, target_size: int | None = None) -> None:
        self.settings, self.target_size = settings, target_size
        # A thread semaphore (decodes run in worker threads): it bounds the full-size buffers alive at once.
        self._decodes = threading.BoundedSemaphore(max(1, settings.max_concurrent_decodes))

    def new_budget(self) -> DecodeBudget:
        return DecodeBudget(self.settings.max_request_pixels)

    def _load(self, source: Any, param: str, budget: DecodeBudget | None) -> Any:
        try:
            with self._decodes:
                return load_image(
                    source, name=param, max_bytes=self.settings.max_image_bytes,
                    max_pixels=self.settings.max_image_pixels, target_size=self.target_size, budget=budget,
                )  # fmt: skip
        except ImageError as err:
            raise APIError(400, str(err), param=param, code=err.code) from None

    async def resolve(self, url: Any, param: str, budget: DecodeBudget | None = None) -> Any:
        if not isinstance(url, str) or not url.strip():
            raise APIError(400, "image_url.url must be a non-empty string", param=param, code="invalid_value")
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            payload = url.partition(",")[2]
            if len(payload) * 3 // 4 > self.settings.max_image_bytes:
                raise APIError(
                    400, f"image {param}: over the limit of {self.settings.max_image_bytes:,} bytes; send a smaller image",
                    param=param, code="image_too_large",
                )  # fmt: skip
            if not _BASE64_CHARS.match(payload):
                raise APIError(
                    400, f"image {param}: the data URL is not valid base64", param=param, code="invalid_image"
                )
            return await run_in_threadpool(self._load, url, param, budget)
        if scheme in ("http", "https"):
            data = await self._fetch(url, param)
            return await run_in_threadpool(self._load, data, param, budget)
        if scheme == "file":
            return await run_in_threadpool(self._load, self._file_path(url, param), param, budget)
        raise APIError(
            400, f"image {param}: only data:image/...;base64 URLs are accepted (got a {scheme or 'plain'} reference)",
            param=param, code="image_url_not_allowed",
        )  # fmt: skip

    def _file_path(self, url: str, param: str) -> Path:
        refusal = APIError(
            400, f"image {param}: file URLs are refused unless the file lies in a folder the server allows "
            "(--allow-image-dirs)", param=param, code="image_url_not_allowed",
        )  # fmt: skip
        dirs = self.settings.allowed_dirs_resolved
        parts = urlsplit(url)
        if not dirs or parts.netloc not in ("", "localhost"):
            raise refusal
        path = unquote(parts.path)
        if "\x00" in path:  # os calls refuse NUL bytes with ValueError; no file name holds one
            raise refusal
        try:
            # resolve() follows symlinks and '..': a link inside an allowed folder cannot point outside it.
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):  # a symlink loop, a name too long
            raise refusal from None
        if not any(resolved.is_relative_to(d) for d in dirs):
            raise refusal
        return resolved

    async def _fetch(self, url: str, param: str) -> bytes:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        # Exact names only: "evil-allowed.com" or "allowed.com.evil.net" must not pass for "allowed.com".
        if not host or host not in self.settings.allowed_hosts_lower:
            raise APIError(
                400, f"image {param}: http(s) image URLs are refused unless their host is allowed "
                "(--allow-image-hosts); send the image as a data:image/...;base64 URL", param=param,
                code="image_url_not_allowed",
            )  # fmt: skip
        seconds = self.settings.image_fetch_timeout_s
        try:
            # One deadline for connect, headers and every body byte: httpx's own timeout is per read, so a
            # host sending a byte a second would otherwise hold the request for as long as it likes.
            async with asyncio.timeout(seconds):
                return await self._download(url, param)
        except TimeoutError:
            raise APIError(
                400, f"image {param}: fetching it took longer than {seconds:g} s", param=param,
                code="image_fetch_timeout",
            ) from None  # fmt: skip

    async def _download(self, url: str, param: str) -> bytes:
        import httpx

        limit = self.settings.max_image_bytes
        try:
            # No redirects: a redirect could lead to a host that is not allowed.
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise APIError(
                            400, f"image {param}: fetching it returned HTTP {response.status_code}", param=param,
                            code="image_fetch_failed",
                        )  # fmt: skip
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise APIError(
                                400, f"image {param}: over the limit of {limit:,} bytes", param=param,
                                code="image_too_large",
                            )  # fmt: skip
                    return bytes(data)
        except httpx.HTTPError as err:
            raise APIError(
                400, f"image {param}: could not be fetched ({type(err).__name__})", param=param,
                code="image_fetch_failed",
            ) from None  # fmt: skip


async def to_chat_messages(
    messages: list[Any], resolver: ImageResolver, settings: ServerSettings
) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    n_images = 0
    budget = resolver.new_budget()  # one pixel budget for all images of the request
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", param=where, code="invalid_type")
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                400, f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role",
                code="invalid_value",
            )  # fmt: skip
        content = msg.get("content")
        texts: list[str] = []
        images: list[Any] = []
        if content is None:
            pass
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise APIError(400, f"{pw}.text must be a string", param=pw, code="invalid_type")
                    texts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise APIError(400, f"{pw}: only user messages may carry images", param=pw)
                    n_images += 1
                    if n_images > settings.max_images:
                        raise APIError(
                            400,
                            f"at most {settings.max_images} images per request",
                            param=pw,
                            code="too_many_images",
                        )
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    images.append(await resolver.resolve(url, pw, budget))
                else:
                    raise APIError(
                        400, f"{pw}: content part type {kind!r} is not supported (text, image_url)", param=pw,
                        code="invalid_value",
                    )  # fmt: skip
        else:
            raise APIError(
                400, f"{where}.content must be a string or a list of parts", param=where, code="invalid_type"
            )
        out.append(ChatMessage(role=role, text="\n".join(t for t in texts if t), images=images))
    return out


# --- responses ----------------------------------------------------------------------------------------
def _sse(payload: dict | str) -> bytes:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n".encode()


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _script_hashes(html: str, tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


def _page() -> tuple[str, dict[str, str]]:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    # The page's inline script and style are allowed by hash only: no other script can run on it.
    csp = (
        "default-src 'none'; "
        f"script-src {' '.join(_script_hashes(html, 'script')) or chr(39) + 'none' + chr(39)}; "
        f"style-src {' '.join(_script_hashes(html, 'style')) or chr(39) + 'none' + chr(39)}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return html, headers


def _host_name(host: str) -> str:
    """The name part of a Host header or host setting, lower case: no port, no brackets, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


class _Guard:
    """Checks every HTTP request before the app sees it: the Host header names this server (DNS
    rebinding), a browser's Origin is this server's own or allowed (cross-site requests), a POST body is
    declared application/json (so a cross-site form or text/plain "simple request" cannot carry it) and
    a declared Content-Length is within the limit (the chat endpoint also counts chunked bodies)."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    def refusal(self, scope: dict) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        allowed = self.settings.allowed_hosts
        if "*" not in allowed and _host_name(host) not in allowed:
            return error_response(
                400, "the Host header does not name this server; start it with --allowed-hosts to accept "
                "other names", param="Host", code="host_not_allowed",
            )  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin.strip().lower().rstrip("/"), host):
            return error_response(
                403, "requests from this Origin are refused; start the server with --allowed-origins to "
                "accept it", type="permission_error", param="Origin", code="origin_not_allowed",
            )  # fmt: skip
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope.get("method") == "POST" and media_type != "application/json":
            return error_response(
                415, "the request body must be sent with Content-Type: application/json",
                param="Content-Type", code="unsupported_media_type",
            )  # fmt: skip
        length = headers.get("content-length")
        if length is not None and (
            not length.strip().isdigit() or int(length) > self.settings.max_body_bytes
        ):
            return error_response(
                413, f"the request body is over the limit of {self.settings.max_body_bytes:,} bytes",
                code="request_too_large",
            )  # fmt: skip
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        allowed = self.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        scheme, sep, netloc = origin.partition("://")
        return bool(sep) and scheme in ("http", "https") and netloc == host.strip().lower()  # same origin

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        response = self.refusal(scope) if scope["type"] == "http" else None
        if response is not None:
            logger.info("refused %s %s: %d", scope.get("method"), scope.get("path"), response.status_code)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value: Any) -> None:
    """Refuses lone surrogates (the JSON escape "\\ud800" alone is valid JSON, not Unicode text): the
    tokenizer and the UTF-8 encoding of any reply that echoes the string would fail. Iterative: no
    recursion limit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise APIError(
                    400, "the request contains a lone surrogate (\\ud800-\\udfff): not valid Unicode"
                )
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, counted while read (chunked bodies have no Content-Length)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise APIError(
                413, f"the request body is over the limit of {max_bytes:,} bytes", code="request_too_large"
            )
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({getattr(err, 'msg', err)})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise APIError(400, f"the request body has a value out of range ({err})") from None
    _check_unicode(body)
    return body


def chat_request_schema(settings: ServerSettings, model_name: str) -> dict[str, Any]:
    """The JSON schema of a chat completions request this server accepts (published in /openapi.json;
    the parser in `parse_chat_request` is what enforces it, with OpenAI-shaped errors)."""
    number = {"type": ["number", "null"]}
    text_part = {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }  # fmt: skip
    image_part = {
        "type": "object", "required": ["type", "image_url"],
        "properties": {
            "type": {"const": "image_url"},
            "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
        },
    }  # fmt: skip
    content = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [text_part, image_part]}}]}
    message = {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": content},
    }  # fmt: skip
    max_tokens = {"type": ["integer", "null"], "minimum": 1, "maximum": settings.max_tokens_limit}
    stop = {"type": "string", "maxLength": settings.max_stop_chars}
    return {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "enum": [model_name]},
            "messages": {"type": "array", "minItems": 1, "maxItems": settings.max_messages, "items": message},
            "max_tokens": max_tokens,
            "max_completion_tokens": max_tokens,
            "temperature": {**number, "minimum": 0, "maximum": 2},
            "top_p": {**number, "minimum": 0, "maximum": 1},
            "n": {"type": ["integer", "null"], "minimum": 1, "maximum": settings.max_n},
            "seed": {"type": ["integer", "null"]},
            "stop": {
                "anyOf": [
                    stop,
                    {"type": "array", "items": stop, "maxItems": settings.max_stop},
                    {"type": "null"},
                ]
            },
            "stream": {"type": "boolean"},
            "stream_options": {
                "type": ["object", "null"],
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "metalm_encode": {"type": ["boolean", "null"]},
        },
    }


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _completion_body(rid: str, now: int, model: str, result: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": _finish_reason(c.finish_reason),
                "logprobs": None,
            }
            for i, c in enumerate(result.completions)
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


_TIMEOUT = dict(type="timeout_error", code="timeout")


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
                raise APIError(408, "the request took longer than the time limit", **_TIMEOUT) from None
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 0.5
            if await request.is_disconnected():
                job.cancel()  # nobody is waiting for the answer: free the batch row
                return False


# --- the app ------------------------------------------------------------------------------------------
def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `settings`. The engine's batch worker starts with the app;
    the caller owns the engine (and closes it)."""
    settings = settings or ServerSettings()
    model_name = settings.model_name or engine.name
    engine.max_pending = settings.max_concurrent_requests
    max_prompt = settings.max_prompt_tokens or engine.context_length
    resolver = ImageResolver(settings, target_size=engine.image_size)
    page_html, page_headers = _page()
    created = int(time.time())
    state = {"in_flight": 0, "served": 0, "refused": 0}
    expected_key = f"Bearer {settings.api_key}".encode() if settings.api_key is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(
        title="metalm", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan
    )
    app.add_middleware(_Guard, settings=settings)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        state["refused"] += 1
        logger.info("refused %s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid request")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", type="server_error")

    def _check_key(request: Request) -> None:
        if expected_key is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, expected_key):  # constant time: no guessing byte by byte
            raise APIError(
                401, "missing or wrong API key", type="authentication_error", code="invalid_api_key"
            )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page_html, headers=page_headers)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "in_flight": state["in_flight"],
            "pending": engine.pending,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _check_key(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "metalm"}],
        }

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request) -> dict:
        _check_key(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "metalm"}

    error_content = {"application/json": {"schema": _ERROR_SCHEMA}}
    chat_openapi = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": chat_request_schema(settings, model_name)}},
        },
        "responses": {
            str(code): {"description": "refused", "content": error_content}
            for code in (400, 401, 403, 404, 408, 413, 415, 429)
        },
    }

    @app.post("/v1/chat/completions", openapi_extra=chat_openapi)
    async def chat_completions(request: Request) -> Any:
        _check_key(request)
        deadline = time.monotonic() + settings.request_timeout_s
        req = parse_chat_request(await read_json_body(request, settings.max_body_bytes), settings, model_name)
        if state["in_flight"] >= settings.max_concurrent_requests:
            raise APIError(
                429, f"the server is busy ({state['in_flight']} requests in flight); retry later",
                type="rate_limit_error", code="rate_limit_exceeded",
            )  # fmt: skip
        state["in_flight"] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state["in_flight"] -= 1

        try:
            response = await _answer(request, req, deadline, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):
            release()  # a stream releases the slot when it ends
        return response

    async def _submit(
        req: ChatRequest, messages: list[ChatMessage], deadline: float, events: asyncio.Queue
    ) -> Job:
        loop = asyncio.get_running_loop()

        def on_event(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown); nothing left to deliver to
                pass

        def submit() -> Job:
            prompt = engine.prepare(engine.chat_parts(messages, encode=req.encode))
            if max_prompt is not None and prompt.num_tokens > max_prompt:
                raise APIError(
                    400, f"the prompt takes {prompt.num_tokens} tokens, over the limit of {max_prompt}",
                    param="messages", code="context_length_exceeded",
                )  # fmt: skip
            return engine.submit(prompt, req.params, deadline=deadline, on_event=on_event)

        try:
            return await run_in_threadpool(submit)
        except InputError as err:
            raise APIError(400, str(err), param="messages") from None
        except QueueFull as err:
            raise APIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded") from None

    async def _answer(request: Request, req: ChatRequest, deadline: float, release: Any) -> Any:
        started = time.monotonic()
        messages = await to_chat_messages(req.messages, resolver, settings)
        events: asyncio.Queue = asyncio.Queue()
        job = await _submit(req, messages, deadline, events)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        remaining = max(0.1, deadline - time.monotonic()) + 5.0  # the worker enforces the deadline itself
        if req.stream:
            try:
                first = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                job.cancel()
                raise APIError(408, "the request took longer than the time limit", **_TIMEOUT) from None
            if Job.is_end(first):
                _raise_job_error(job)
            return StreamingResponse(
                _stream(job, first, events, rid, now, model_name, req, release, deadline + 5.0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        if not await _wait_for_end(job, events, request, remaining):
            logger.info("%s: client went away", rid)
            return JSONResponse({}, status_code=499)
        result = _job_result(job)
        state["served"] += 1
        logger.info(
            "%s: %d prompt + %d completion tokens in %.2f s", rid, result.prompt_tokens,
            result.completion_tokens, time.monotonic() - started,
        )  # fmt: skip
        return _completion_body(rid, now, model_name, result)

    async def _stream(
        job: Job, first: Any, events: asyncio.Queue, rid: str, now: int, model: str, req: ChatRequest,
        release: Any, hard_deadline: float,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            body: dict[str, Any] = {
                "id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                "system_fingerprint": None, "choices": choices,
            }  # fmt: skip
            if req.include_usage:
                body["usage"] = usage
            return _sse(body)

        completion_tokens = 0
        try:
            yield chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(req.params.n)]
            )  # fmt: skip
            item = first
            while not Job.is_end(item):
                ev: StreamEvent = item
                if ev.finish_reason is not None:
                    completion_tokens += len(job.completions[ev.index].token_ids)
                    yield chunk(
                        [{"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(ev.finish_reason)}]
                    )  # fmt: skip
                elif ev.text:
                    yield chunk(
                        [
                            {
                                "index": ev.index,
                                "delta": {"content": ev.text},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                try:
                    item = await asyncio.wait_for(events.get(), max(0.1, hard_deadline - time.monotonic()))
                except TimeoutError:
                    job.cancel()
                    break
            if job.error is not None:
                logger.info("%s: stream ended by %s", rid, type(job.error).__name__)
                err = _error_body(job.error)
                yield _sse(err)
            elif req.include_usage:
                prompt_tokens = job.prompt.num_tokens
                yield chunk(
                    [], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens},
                )  # fmt: skip
            yield _sse("[DONE]")
            state["served"] += 1
        finally:
            if not job.done:
                job.cancel()  # the client went away: free the batch row
            release()

    return app


def _error_body(error: BaseException) -> dict:
    if isinstance(error, JobTimeout):
        return {"error": {"message": str(error), "type": "timeout_error", "param": None, "code": "timeout"}}
    if isinstance(error, InputError):
        return {
            "error": {
                "message": str(error),
                "type": "invalid_request_error",
                "param": "messages",
                "code": None,
            }
        }
    return {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    }


def _raise_job_error(job: Job) -> None:
    error = job.error
    if error is None:
        return
    if isinstance(error, JobTimeout):
        raise APIError(408, str(error), type="timeout_error", code="timeout")
    if isinstance(error, InputError):
        raise APIError(400, str(error), param="messages")
    raise APIError(500, "internal server error", type="server_error")  # the engine logged the trace


def _job_result(job: Job):
    _raise_job_error(job)
    return job.result(timeout=0)

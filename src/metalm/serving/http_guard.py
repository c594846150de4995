"""What every HTTP request must pass before an endpoint sees it (`HTTPGuard`: Host, Origin,
Content-Type, declared length), and parsing a JSON body safely (`parse_json`: no deep nesting, huge
numbers or lone surrogates)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi.responses import JSONResponse

from metalm.serving.errors import APIError, one_line
from metalm.serving.settings import ServerSettings, host_name

__all__ = ["HTTPGuard", "parse_json"]

logger = logging.getLogger("metalm.serving")


class HTTPGuard:
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
        if "*" not in allowed and host_name(host) not in allowed:
            return APIError(
                400, "the Host header does not name this server; start it with --allowed-hosts to accept "
                "other names", param="Host", code="host_not_allowed",
            ).response()  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin.strip().lower().rstrip("/"), host):
            return APIError(
                403, "requests from this Origin are refused; start the server with --allowed-origins to "
                "accept it", type="permission_error", param="Origin", code="origin_not_allowed",
            ).response()  # fmt: skip
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope.get("method") == "POST" and media_type != "application/json":
            return APIError(
                415, "the request body must be sent with Content-Type: application/json",
                param="Content-Type", code="unsupported_media_type",
            ).response()  # fmt: skip
        length = headers.get("content-length")
        if length is not None and (
            not length.strip().isdigit() or int(length) > self.settings.max_body_bytes
        ):
            return APIError(
                413, f"the request body is over the limit of {self.settings.max_body_bytes:,} bytes",
                code="request_too_large",
            ).response()  # fmt: skip
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
            path = one_line(scope.get("path"))
            logger.info("refused %s %s: %d", one_line(scope.get("method")), path, response.status_code)
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


def parse_json(data: bytes | bytearray) -> Any:
    """A JSON body, refused (400) when malformed, nested too deeply, out of range or not Unicode. CPU
    work: callers run it off the event loop (`metalm.serving.admission.BodyReader`)."""
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

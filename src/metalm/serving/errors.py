"""Every refusal the server gives, in OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}``: `APIError` is the one way to say no, and this module the one place that turns anything else
(validation errors, engine errors, routing errors, bugs) into one."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from metalm.data.processor import InputError
from metalm.serving.request_types import JobTimeout, QueueFull

__all__ = ["APIError", "install_error_handlers", "one_line", "refusal_for", "validation_refusal"]

logger = logging.getLogger("metalm.serving")


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def refuse_over_limit(parts: list[tuple[int, int, Any]], limit: int, what: str, code: str) -> None:
    """A 400 naming the first of `parts` ((message, content, part) triples) past `limit`, if there is one."""
    if len(parts) > limit:
        i, j, _ = parts[limit]
        raise APIError(
            400, f"at most {limit} {what} per request", param=f"messages[{i}].content[{j}]", code=code
        )


def one_line(text: object) -> str:
    """`text` safe for one log line: control characters (a newline in a client's `model` value would
    forge a log line) written as escapes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def request_timeout() -> APIError:
    return APIError(408, "the request took longer than the time limit", type="timeout_error", code="timeout")


def refusal_for(error: BaseException) -> APIError:
    """The refusal for an error the engine raised or a job ended with. Anything unexpected becomes a
    generic 500: its details stay in the log (the engine logs the traces of failed jobs)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, JobTimeout):
        return APIError(408, str(error), type="timeout_error", code="timeout")
    if isinstance(error, InputError):
        return APIError(400, str(error), param="messages")
    if isinstance(error, QueueFull):
        return APIError(429, str(error), type="rate_limit_error", code="rate_limit_exceeded")
    return APIError(500, "internal server error", type="server_error")


# Pydantic error types that mean "not the right kind of value" rather than "a value out of range".
_TYPE_ERRORS = ("_type", "_parsing")
_CUSTOM_STATUS = {"model_not_found": 404}  # custom error types raised by the request schema's validators


def validation_refusal(error: ValidationError | RequestValidationError, data: Any) -> APIError:
    """The error of a failed validation of `data` to report, named by its path in the request
    (``messages[0].content[1].text``): the first field's, and of a union (``content``: a string or a list
    of parts) the branch that got furthest into the value."""
    errors = error.errors()
    field = errors[0]["loc"][:1]
    chosen = max(
        (e for e in errors if e["loc"][:1] == field),
        key=lambda e: (len(_steps(e["loc"], data)), not e["type"].endswith(_TYPE_ERRORS)),
    )
    kind = chosen["type"]
    param = _path(_steps(chosen["loc"], data))
    if kind in _CUSTOM_STATUS or kind == "unsupported_parameter":
        code = kind
    elif kind == "missing":
        code = "missing_required_parameter"
    elif kind.endswith(_TYPE_ERRORS) or kind in ("int_from_float", "model_type"):
        code = "invalid_type"
    else:
        code = "invalid_value"
    message = chosen["msg"]
    if kind == "model_type":  # pydantic says "a valid dictionary or instance of <class>"
        message = f"'{param}' must be a JSON object" if param else "the request body must be a JSON object"
    elif param is not None and kind not in _CUSTOM_STATUS:
        message = f"'{param}': {message}"
    return APIError(_CUSTOM_STATUS.get(kind, 400), message, param=param, code=code)


def _steps(loc: tuple[int | str, ...], data: Any) -> list[int | str]:
    """``loc`` as steps into the request. Pydantic's locations also name union branches and
    discriminator tags ("list[...]", "image_url"): a step is kept only where `data` has it, except a last
    key, which names a missing field."""
    steps: list[int | str] = []
    node = data
    for i, step in enumerate(loc):
        if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
            steps.append(step)
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict) and (step in node or i == len(loc) - 1):
            steps.append(step)
            node = node.get(step)
    return steps


def _path(steps: list[int | str]) -> str | None:
    path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
    return path or None


def install_error_handlers(app: FastAPI) -> None:
    """Routes every exception an endpoint raises through the shapes above."""

    @app.exception_handler(APIError)
    async def refused(request: Request, exc: APIError) -> JSONResponse:
        path, message = one_line(request.url.path), one_line(exc.message)
        logger.info("refused %s %s: %d %s", request.method, path, exc.status, message)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_refusal(exc, exc.body).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, one_line(request.url.path))
        return refusal_for(exc).response()

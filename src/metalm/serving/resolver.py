"""Where a request's images come from: `ImageResolver` turns an ``image_url`` into a decoded image under
the server's rules (data URLs always; http(s) and file URLs only where allowed; sizes, pixels and
decodes at once bounded)."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from starlette.concurrency import run_in_threadpool

from metalm.data.images import DecodeBudget, ImageError, load_image
from metalm.serving.errors import APIError
from metalm.serving.settings import ServerSettings

__all__ = ["ImageResolver"]


def _split(url: str, param: str) -> SplitResult:
    """`urlsplit(url)` with its host and port checked, or a 400: urlsplit raises ValueError on
    "http://[::1/x", on hosts that NFKC-normalise to a separator and on ports out of range."""
    try:
        parts = urlsplit(url)
        parts.hostname, parts.port  # noqa: B018  (both parse lazily and may raise)
    except ValueError:
        raise APIError(
            400, f"image {param}: the URL is malformed", param=param, code="invalid_image_url"
        ) from None
    return parts


def _check_response(response: Any, param: str) -> None:
    """Refuses an image host's answer that is not a plain 200 with an identity-encoded body."""
    if response.status_code != 200:
        raise APIError(
            400, f"image {param}: fetching it returned HTTP {response.status_code}", param=param,
            code="image_fetch_failed",
        )  # fmt: skip
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(
            400, f"image {param}: the host sent a compressed body (Content-Encoding: {encoding[:40]}); "
            "image fetches take uncompressed bodies only", param=param, code="image_fetch_failed",
        )  # fmt: skip


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
        parts = _split(url, param)
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
        host = (_split(url, param).hostname or "").lower().rstrip(".")
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
                # Identity only: a compressed body is a decompression bomb in waiting (1.8 KB of
                # "gzip, gzip" inflates to 2 GB in one zlib call, on the event loop), and images are
                # compressed already. The raw bytes are read, so nothing is ever inflated here.
                async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                    _check_response(response, param)
                    data = bytearray()
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > limit:
                            raise APIError(
                                400, f"image {param}: over the limit of {limit:,} bytes", param=param,
                                code="image_too_large",
                            )  # fmt: skip
                    return bytes(data)
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise APIError(
                400, f"image {param}: could not be fetched ({type(err).__name__})", param=param,
                code="image_fetch_failed",
            ) from None  # fmt: skip

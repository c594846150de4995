"""The server's limits and safety switches (`ServerSettings`); the defaults are the safe ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServerSettings", "host_name"]


def host_name(host: str) -> str:
    """The name part of a Host header or host setting, lower case: no port, no brackets, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


@dataclass
class ServerSettings:
    """Limits and safety switches of the server (defaults are the safe ones)."""

    model_name: str | None = None  # the id clients must send; default: the engine's name
    max_body_bytes: int = 12_000_000  # a base64 data URL is 4/3 of the image's bytes
    max_json_values: int = 100_000  # brackets, commas and colons in a body, counted before parsing
    max_concurrent_parses: int = 2  # bodies parsed at once, server-wide (each holds <= ~4 x its bytes)
    max_image_bytes: int = 8_000_000
    max_image_pixels: int = 16_777_216  # 4096 x 4096; checked from the header, before decoding
    max_request_pixels: int = 33_554_432  # decoded by all images of one request together
    max_concurrent_decodes: int = 2  # full-size decodes at once, server-wide (each may take ~100 MB)
    max_images: int = 8  # per request
    max_audio_bytes: int = 8_000_000  # one input_audio clip, decoded from its base64
    max_audio_seconds: float = 30.0  # one clip (the audio encoder's own limit applies too)
    max_audio_clips: int = 4  # per request
    max_concurrent_audio_decodes: int = 2  # clip decodes at once, server-wide (each holds <= ~6 MB)
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
        self.allowed_hosts = tuple(host_name(h) for h in self.allowed_hosts if h.strip())
        self.allowed_origins = tuple(o.strip().lower().rstrip("/") for o in self.allowed_origins if o.strip())
        self.allowed_dirs_resolved = tuple(Path(d).expanduser().resolve() for d in self.allow_image_dirs)
        for d in self.allowed_dirs_resolved:
            if not d.is_dir():
                raise ValueError(f"--allow-image-dirs: {d} is not a folder")

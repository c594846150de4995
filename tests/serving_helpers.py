"""Helpers shared by the serving tests: the test settings, a live uvicorn on a free loopback port, a chat
request's user turn, a PNG data URL, OpenAI's error shape, and RSS sampling. The saved tiny model
(`serving_model_dir`) and the module-scoped server and client (`live`, `client`) are fixtures in
conftest.py. Importing this module skips the importing test module when uvicorn is missing."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metalm.serving.engine import Engine
from metalm.serving.server import ServerSettings, create_app

uvicorn = pytest.importorskip("uvicorn")

MODEL_NAME = "tiny-metalm"
TEST_SETTINGS = dict(
    model_name=MODEL_NAME,
    max_body_bytes=1_000_000,
    max_image_bytes=200_000,
    max_image_pixels=1_000_000,
    max_tokens_limit=64,
    default_max_tokens=8,
    request_timeout_s=30.0,
)


class LiveServer:
    """uvicorn in a background thread on a free loopback port (the socket is bound first: no race)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(condition, timeout: float = 20.0, what: str = "the condition") -> None:
    """Polls `condition` until it holds; fails the test (instead of hanging) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def start_live_server(model_dir: Path, **overrides):
    """(engine, LiveServer) for a saved model; the caller enters the server and closes the engine."""
    engine = Engine.from_pretrained(model_dir, device="cpu", name=MODEL_NAME, max_batch_size=16)
    settings = ServerSettings(**{**TEST_SETTINGS, **overrides})
    return engine, LiveServer(create_app(engine, settings))


def png_data_url(size: tuple[int, int] = (24, 24), noise: bool = False, seed: int = 0) -> str:
    if noise:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(arr)
    else:
        img = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(text: str, *images: str) -> list[dict]:
    """The `messages` of a chat request: one user turn, its text then its image URLs."""
    content = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in images
    ]
    return [{"role": "user", "content": content}]


def assert_error_shape(body: dict) -> dict:
    """Asserts `body` is an error in OpenAI's shape (and no traceback); returns its `error`."""
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return error


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_during(fn) -> tuple[float, float, float, object]:
    """(RSS before, peak while `fn` runs, after; in MB) and fn's result. Sampled every 5 ms."""
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join(5)
    return before, max(peak[0], rss_mb()), rss_mb(), result


def palette_png(side: int) -> bytes:
    """A palette PNG with a tRNS chunk (every entry its own alpha), compressible: small on the wire."""
    arr = np.tile(np.arange(256, dtype=np.uint8), (side, side // 256 or 1))[:, :side]
    img = Image.fromarray(arr, "L").convert("P")
    img.putpalette([(i * 7) % 256 for i in range(768)])
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=bytes(range(256)))
    return buf.getvalue()

"""Hardening, round two (issue #24): each hostile probe that did not hold, as a test that measures what
it cost (time, and RSS where the issue measured memory). Tiny random models; no network."""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.server
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metalm.data.audio import AudioError, load_audio
from metalm.data.images import release_memory
from metalm.serving.engine import Engine
from metalm.serving.server import APIError, ImageResolver, ServerSettings, create_app
from tests.serving_helpers import (
    MODEL_NAME,
    LiveServer,
    palette_png,
    peak_rss_during,
    rss_mb,
    start_live_server,
)

soundfile = pytest.importorskip("soundfile")


def _client(engine: Engine, **settings):
    from fastapi.testclient import TestClient

    return TestClient(
        create_app(engine, ServerSettings(model_name="tiny", **settings)), base_url="http://127.0.0.1"
    )


# --- 1. audio decompression bombs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def hour_of_silence() -> bytes:
    """The issue's bomb: ~673 KB of FLAC holding 1 h of 48 kHz stereo silence (1.3 GB as float32)."""
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", samplerate=48_000, channels=2, format="FLAC") as sound:
        minute = np.zeros((48_000 * 60, 2), dtype=np.int16)
        for _ in range(60):
            sound.write(minute)
    return buf.getvalue()


def _unknown_length(flac: bytes) -> bytes:
    """The same stream with STREAMINFO's total-samples field zeroed ("length unknown"): a header that
    says nothing, so only reading in bounded blocks can stop it."""
    data = bytearray(flac)
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # rate, channels, bits, then 36-bit length
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


@pytest.mark.parametrize("header", ["honest", "length unknown"])
def test_an_hour_of_flac_is_refused_without_decoding_it(hour_of_silence, header):
    data = hour_of_silence if header == "honest" else _unknown_length(hour_of_silence)
    start = time.monotonic()

    def refuse() -> AudioError:
        with pytest.raises(AudioError) as info:
            load_audio(data, name="clip", max_seconds=30)
        return info.value

    before, peak, _, err = peak_rss_during(refuse)
    seconds = time.monotonic() - start
    print(
        f"\n{header}: {len(data):,} bytes refused in {seconds:.2f} s, RSS +{peak - before:.0f} MB at the peak"
    )
    assert err.code == "audio_too_long"
    assert peak - before < 40 and seconds < 2  # was +1.3 GB and ~17 s: the whole hour decoded first


def test_audio_to_a_model_without_an_audio_encoder_is_refused_unread(tiny_saved, hour_of_silence):
    engine = Engine.from_pretrained(tiny_saved, device="cpu", name="tiny")
    b64 = base64.b64encode(hour_of_silence).decode()
    body = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}],
            }
        ],
        "max_tokens": 2,
    }
    try:
        with _client(engine) as client:
            before, peak, _, response = peak_rss_during(
                lambda: client.post("/v1/chat/completions", json=body)
            )
    finally:
        engine.close()
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "audio_not_supported", response.text
    assert error["param"] == "messages[0].content[0]" and "no audio encoder" in error["message"]
    assert peak - before < 60  # the 900 KB body is parsed, the clip never decoded


def test_audio_errors_carry_no_memory_addresses():
    with pytest.raises(AudioError) as info:
        load_audio(b"RIFF....WAVEjunk" * 4, name="clip")
    assert " at 0x" not in str(info.value) and info.value.code == "invalid_audio"


# --- 2. prompt text bounded before tokenizing; 4. admission before parsing, parsing bounded --------------
@pytest.fixture(scope="module")
def live_tiny(tiny_saved):
    """A live server on the tiny model with the default 12 MB body limit."""
    engine, server = start_live_server(tiny_saved, max_body_bytes=12_000_000)
    with server:
        yield server.server.config.app.state.metalm, server.url
    engine.close()


def _post_raw(url: str, raw: bytes, timeout: float = 120) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.post(
        url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )
    return response, time.monotonic() - start


def _settled_rss(seconds: float = 1.5) -> float:
    time.sleep(seconds)  # the server trims freed memory within half a second of a large request
    # The client half of these tests runs in this process too: its freed request bodies (tens of MB each)
    # would otherwise stay resident in glibc's heap and count as the server's growth; a leak is not freed,
    # so trimming leaves it in the figure.
    release_memory()
    return rss_mb()


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(live_tiny):
    _, url = live_tiny
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "a " * 1_500_000}], "max_tokens": 2}
    raw = json.dumps(body).encode()
    _post_raw(url, raw)  # warm up (first-request allocations are not what is measured)
    base = _settled_rss()
    before, peak, _, (response, seconds) = peak_rss_during(lambda: _post_raw(url, raw))
    after = _settled_rss()
    print(
        f"\n3 MB prompt: {seconds:.2f} s, RSS {base:.0f} MB, peak +{peak - before:.0f}, after +{after - base:.0f}"
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert seconds < 2 and peak - before < 80 and after - base < 30  # was ~10 s and +600 MB, kept


def test_a_full_server_refuses_before_reading_the_body(live_tiny):
    state, url = live_tiny
    state.limiter.count = state.limiter.limit  # every place in flight taken
    try:
        response, _ = _post_raw(url, b"{not json")
    finally:
        state.limiter.count = 0
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_body_of_a_million_empty_objects_is_refused_before_parsing(live_tiny):
    _, url = live_tiny
    raw = (
        b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"metadata":['
        % MODEL_NAME.encode()
    )
    raw += b"{}," * 3_800_000 + b"{}]}"  # 11.4 MB: ~255 MB once parsed
    before, peak, _, (response, seconds) = peak_rss_during(lambda: _post_raw(url, raw))
    print(f"\n{len(raw):,} byte body of empty objects: {seconds:.2f} s, RSS peak +{peak - before:.0f} MB")
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_json_values"
    assert peak - before < 60 and seconds < 2


# --- 3. compressed image fetches; 7. malformed URLs ----------------------------------------------------
class _GzipBombHost(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a doubly gzipped body of zeros, whatever the client accepts."""

    body = b""

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", "gzip, gzip")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def gzip_bomb_host():
    _GzipBombHost.body = gzip.compress(gzip.compress(bytes(200_000_000), 9), 9)  # 200 MB in a few KB
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GzipBombHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_double_gzip_image_is_refused_without_inflating_it(gzip_bomb_host):
    resolver = ImageResolver(ServerSettings(allow_image_hosts=("127.0.0.1",), image_fetch_timeout_s=3))

    def fetch() -> APIError:
        with pytest.raises(APIError) as info:
            asyncio.run(resolver.resolve(gzip_bomb_host + "/bomb.png", "messages[0].content[0]"))
        return info.value

    start = time.monotonic()
    before, peak, _, err = peak_rss_during(fetch)
    seconds = time.monotonic() - start
    print(
        f"\n{len(_GzipBombHost.body):,} bytes of gzip, gzip: {seconds:.2f} s, RSS peak +{peak - before:.0f} MB"
    )
    assert err.status == 400 and err.code == "image_fetch_failed" and "Content-Encoding" in err.message
    assert peak - before < 30 and seconds < 1  # was +200 MB inflated in one call on the event loop


# Pieces that trip URL parsers: brackets, ports, NFKC look-alikes of separators ("\uff0f" is "/").
_URL_PIECES = list("[]:/@%?#.\\ -_aZ09") + [
    "::1",
    "\u3002",
    "\uff0e",
    "\uff0f",
    "\uff03",
    "\u2100",
    "99999",
    "%00",
]
_URL_TEXT = st.lists(st.sampled_from(_URL_PIECES), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(
        ["http://", "https://", "file://", "HTTP://", "file:", "http:", "data:", "ftp://", ""]
    ),
    host=st.sampled_from(
        ["[::1", "[::1]", "127.0.0.1", "localhost", "allowed.test", "a\uff03b", "[v1.x]", ""]
    ),
    rest=_URL_TEXT,
)
def test_no_url_string_is_a_server_error(tmp_path_factory, scheme, host, rest):
    folder = tmp_path_factory.getbasetemp()
    resolver = ImageResolver(
        ServerSettings(
            allow_image_hosts=("allowed.test", "127.0.0.1"),
            allow_image_dirs=(str(folder),),
            image_fetch_timeout_s=0.5,
        )
    )
    try:
        asyncio.run(resolver.resolve(scheme + host + rest, "messages[0].content[0]"))
    except APIError as err:
        assert err.status == 400, (scheme + host + rest, err.status, err.message)


@pytest.mark.parametrize(
    "url", ["http://[::1/x", "file://[::1/x", "http://a\uff03b/x.png", "http://127.0.0.1:99999/x"]
)
def test_malformed_image_urls_are_400s_through_the_server(tiny_saved, url):
    engine = Engine.from_pretrained(tiny_saved, device="cpu", name="tiny")
    content = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    try:
        with _client(engine, allow_image_hosts=("127.0.0.1", "a#b"), allow_image_dirs=("/tmp",)) as client:
            response = client.post("/v1/chat/completions", json=body)
    finally:
        engine.close()
    assert response.status_code == 400, response.text


# --- 7. the low ones (the others: test_vision, test_loading, test_serving_security) ------------------
def test_a_model_name_with_a_newline_cannot_forge_a_log_line(tiny_saved, caplog):
    engine = Engine.from_pretrained(tiny_saved, device="cpu", name="tiny")
    body = {
        "model": "x\n2026-01-01 INFO metalm.serving: FORGED",
        "messages": [{"role": "user", "content": "hi"}],
    }
    try:
        with caplog.at_level("INFO", logger="metalm.serving"), _client(engine) as client:
            response = client.post("/v1/chat/completions", json=body)
    finally:
        engine.close()
    assert response.status_code == 404
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert refused and all("\n" not in line for line in refused) and "\\n2026" in refused[-1]


def test_a_client_leaving_mid_upload_is_not_a_server_error(live_tiny, caplog):
    _, url = live_tiny
    host, port = url.removeprefix("http://").split(":")
    with caplog.at_level("INFO", logger="metalm.serving"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n" + b'{"model": "' + b"a" * 1000
            )
            time.sleep(0.2)
        time.sleep(0.5)
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert not [r for r in caplog.records if "unhandled" in r.getMessage() or r.exc_info]


# --- the bar: a hostile mix holds the memory bound and keeps answering ---------------------------------
def _hostile_bodies(hour_of_silence: bytes, bomb_url: str) -> list[bytes]:
    """One raw body of each hostile kind above (each under the default 12 MB body limit)."""

    def chat(content, **extra) -> bytes:
        return json.dumps(
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **extra}
        ).encode()

    def image(url: str) -> list[dict]:
        return [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]

    flac = base64.b64encode(hour_of_silence).decode()
    palette = "data:image/png;base64," + base64.b64encode(palette_png(4096)).decode()
    meta = chat("hi", max_tokens=1)[:-1] + b',"metadata":[' + b"{}," * 3_800_000 + b"{}]}"
    return [
        chat([{"type": "input_audio", "input_audio": {"data": flac, "format": "wav"}}]),
        chat("a " * 5_950_000),  # 11.9 MB of prompt
        meta,
        chat(image(bomb_url)),
        chat("tell me a story", seed=3, temperature=2.0, max_tokens=200),
        chat(image(palette), max_tokens=2),
        chat(image("http://[::1/x")),
        json.dumps({"model": "x\nFORGED", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    ]


def test_fifty_hostile_requests_hold_the_memory_bound(tiny_saved, hour_of_silence, gzip_bomb_host):
    """50 requests cycling through every hostile kind above, four at a time, against default settings
    (plus --allow-image-hosts for the gzip bomb); a normal request every 0.25 s throughout. RSS ends within
    150 MB of where it started and no normal request waits 2 s (docs/serving.md, "Memory bounds")."""
    engine = Engine.from_pretrained(tiny_saved, device="cpu", name=MODEL_NAME)
    server = LiveServer(
        create_app(engine, ServerSettings(model_name=MODEL_NAME, allow_image_hosts=("127.0.0.1",)))
    )
    bodies = _hostile_bodies(hour_of_silence, gzip_bomb_host + "/bomb.png")
    normal = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    waits, statuses, done = [], [], threading.Event()
    with server:
        url = server.url

        def probe() -> None:
            while not done.is_set():
                start = time.monotonic()
                assert httpx.post(url + "/v1/chat/completions", json=normal, timeout=30).status_code == 200
                waits.append(time.monotonic() - start)
                time.sleep(0.25)

        # Warm every path, then one round as the measured one: first-use allocations (per-thread heaps,
        # caches) are not growth. Measured over 4 rounds after the paths' first use: +81, +41, +21, +12 MB, a
        # plateau; a leak would add the same each round, so the measured round still shows it.
        for body in bodies:
            _post_raw(url, body)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: _post_raw(url, bodies[i % len(bodies)]), range(50)))
        base = _settled_rss()
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            statuses = [
                r.status_code
                for r, _ in pool.map(lambda i: _post_raw(url, bodies[i % len(bodies)]), range(50))
            ]
        seconds = time.monotonic() - start
        done.set()
        prober.join(30)
        after = _settled_rss()
    engine.close()
    print(
        f"\n50 hostile requests in {seconds:.1f} s: RSS {base:.0f} MB before, {after - base:+.0f} MB after; "
        f"{len(waits)} normal requests, slowest {max(waits):.2f} s; statuses {sorted(set(statuses))}"
    )
    assert 500 not in statuses and len(waits) >= 3
    assert after - base < 150 and max(waits) < 2

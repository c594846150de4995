"""Hardening, round two (issue #24): each hostile probe that did not hold, as a test that measures what
it cost (time, and RSS where the issue measured memory). Tiny random models; no network."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest

from metalm.data.audio import AudioError, load_audio
from metalm.serving.engine import Engine
from metalm.serving.server import ServerSettings, create_app
from tests.test_serving import _peak_rss_during

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

    before, peak, _, err = _peak_rss_during(refuse)
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
            before, peak, _, response = _peak_rss_during(
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

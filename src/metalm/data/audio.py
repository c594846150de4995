"""Safe audio loading: a file, bytes, a ``data:audio/...;base64,`` URL or an array → 16 kHz mono float32.

:func:`load_audio` decodes with ``soundfile`` (libsndfile: WAV, FLAC, OGG, MP3), mixes channels down to
mono and resamples to :data:`SAMPLING_RATE` with scipy's polyphase filter, or raises :class:`AudioError`
with a message that names the source and says what to do. It never fetches URLs; payloads over
``max_bytes`` are refused before decoding, clips over ``max_seconds`` from their header before decoding
or at the first block past the limit (:mod:`metalm.data.audio_header`: a small file can hold hours).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from metalm.data.audio_header import AudioError, decode_bounded

__all__ = ["SAMPLING_RATE", "AudioError", "AudioSource", "decode_base64_audio", "load_audio"]

# Whisper's (and so the audio encoder's) input rate.
SAMPLING_RATE = 16_000

AudioSource = str | Path | bytes | bytearray | memoryview | np.ndarray | Any

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_HINT = "pass a WAV/FLAC/OGG/MP3 file path, raw bytes, a data:audio/...;base64 URL or an array of samples"


def decode_base64_audio(payload: str, label: str) -> bytes:
    """The bytes of a base64 payload (standard or URL-safe alphabet, padding optional)."""
    text = "".join(payload.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioError(f"audio {label}: malformed base64 ({exc})") from None


def _data_url_bytes(url: str, label: str) -> bytes:
    header, sep, payload = url.partition(",")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if not sep or not params[0].startswith("audio/") or "base64" not in params[1:]:
        raise AudioError(f"audio {label}: expected a data:audio/<type>;base64,<data> URL")
    return decode_base64_audio(payload, label)


def _source_bytes(source: Any, label: str, max_bytes: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str) and source[:5].lower() == "data:":
        data = _data_url_bytes(source, label)
    elif isinstance(source, str) and _URL_SCHEME.match(source):
        raise AudioError(
            f"audio {label}: {source.split(':', 1)[0]}:// URLs are not fetched; download the file and "
            "pass a local path, bytes or a data:audio/...;base64 URL"
        )
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio {label}: file not found")
        if path.stat().st_size > max_bytes:
            raise AudioError(
                f"audio {label}: more than {max_bytes:,} bytes; send a shorter clip", code="audio_too_large"
            )
        data = path.read_bytes()
    else:
        raise AudioError(f"audio {label}: unsupported source type {type(source).__name__}; {_HINT}")
    if len(data) > max_bytes:
        raise AudioError(
            f"audio {label}: more than {max_bytes:,} bytes; send a shorter clip", code="audio_too_large"
        )
    return data


def _decode(data: bytes, label: str, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        return decode_bounded(data, label, max_seconds)
    except AudioError as err:
        if err.code == "invalid_audio":
            raise AudioError(f"{err}; {_HINT}") from None
        raise


def _mono(samples: np.ndarray, label: str) -> np.ndarray:
    """[T] or [T, C] (channels last, as soundfile reads) → [T]."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise AudioError(
            f"audio {label}: expected samples of shape [T] or [T, channels], got {samples.shape}"
        )
    return samples


def load_audio(
    source: AudioSource,
    *,
    sampling_rate: int | None = None,
    name: str | None = None,
    max_bytes: int = 25_000_000,
    max_seconds: float = 30.0,
    min_seconds: float = 0.1,
) -> np.ndarray:
    """Mono float32 samples at :data:`SAMPLING_RATE` of an audio file, bytes, data URL or array.

    An array (numpy or torch, [T] or [T, channels]) is taken at ``sampling_rate`` (default 16 kHz);
    encoded audio carries its own rate. ``name`` replaces the source's description in messages.

    Raises:
        AudioError: naming the source: undecodable, empty or non-finite, shorter than ``min_seconds``
            or longer than ``max_seconds``, or more than ``max_bytes``.
    """
    label = name or (str(source) if isinstance(source, str | Path) and len(str(source)) < 200 else "input")
    if hasattr(source, "detach"):  # a torch tensor
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        samples, rate = np.asarray(source, dtype=np.float32), int(sampling_rate or SAMPLING_RATE)
    else:
        samples, rate = _decode(_source_bytes(source, label, max_bytes), label, max_seconds)
    samples = _mono(samples, label)
    seconds = len(samples) / rate
    if seconds < min_seconds:
        raise AudioError(f"audio {label}: {seconds:.3f} s is shorter than {min_seconds} s")
    if seconds > max_seconds:
        raise AudioError(
            f"audio {label}: {seconds:.1f} s is longer than the {max_seconds:g} s this encoder takes; "
            "cut the clip",
            code="audio_too_long",
        )
    if not np.isfinite(samples).all():
        raise AudioError(f"audio {label}: samples contain NaN or infinity")
    if rate != SAMPLING_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(rate, SAMPLING_RATE)
        samples = resample_poly(samples, SAMPLING_RATE // g, rate // g).astype(np.float32)
    return samples

"""Decoding audio without trusting it: the header is read first and the samples in bounded blocks.

A compressed clip can be tiny and long: 673 KB of FLAC holds an hour of 48 kHz stereo silence, 1.3 GB of
float32 once decoded. :func:`decode_bounded` reads the header (frames, channels, rate) and refuses an
over-long clip before any sample is decoded; since a header can lie (FLAC may say "length unknown", an
MP3's length is an estimate), the samples are then read in blocks of :data:`BLOCK_FRAMES`, each mixed down
to mono at once, and reading stops as soon as the clip passes ``max_seconds``. The memory one decode holds
is therefore at most ``max_seconds`` of mono float32 at the clip's rate plus one block of all its
channels: with the defaults (30 s, rates up to :data:`MAX_RATE`, :data:`MAX_CHANNELS` channels) under
50 MB, about 6 MB for a 48 kHz clip.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

__all__ = [
    "BLOCK_FRAMES",
    "MAX_CHANNELS",
    "MAX_RATE",
    "AudioError",
    "AudioHeader",
    "decode_bounded",
    "read_header",
]

BLOCK_FRAMES = 65_536  # frames decoded at once: ~2 MB for 8 channels of float32
MAX_RATE = 384_000  # the highest rate audio hardware records at; larger headers are forged
MAX_CHANNELS = 8  # 7.1 surround; more channels is not speech
_UNKNOWN_FRAMES = 2**62  # libsndfile reports "unknown length" (a FLAC header's 0) as INT64_MAX


class AudioError(ValueError):
    """Audio could not be loaded; the message names the source and says what to do. ``code`` is
    ``invalid_audio`` or ``audio_too_long`` / ``audio_too_large`` (the server's error codes)."""

    def __init__(self, message: str, code: str = "invalid_audio") -> None:
        super().__init__(message)
        self.code = code


class AudioHeader:
    """What a clip's header says: its rate, channels and (when stated) frames."""

    def __init__(self, rate: int, channels: int, frames: int | None) -> None:
        self.rate, self.channels, self.frames = rate, channels, frames

    @property
    def seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.rate


def _errors() -> tuple[type[BaseException], ...]:
    import soundfile

    return (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError)


def _reason(exc: BaseException) -> str:
    """libsndfile's own words, without the Python object it was handed ("<_io.BytesIO object at 0x...>":
    a memory address is no business of the client's)."""
    reason = getattr(exc, "error_string", None) or str(exc)
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", reason)


def read_header(sound: Any, label: str) -> AudioHeader:
    """The header of an open `soundfile.SoundFile`; a rate or channel count no real clip has is refused."""
    rate, channels = int(sound.samplerate), int(sound.channels)
    if not 0 < rate <= MAX_RATE:
        raise AudioError(f"audio {label}: a sampling rate of {rate} Hz is not supported (at most {MAX_RATE})")
    if not 0 < channels <= MAX_CHANNELS:
        raise AudioError(f"audio {label}: {channels} channels are not supported (at most {MAX_CHANNELS})")
    frames = int(sound.frames)
    return AudioHeader(rate, channels, None if frames <= 0 or frames >= _UNKNOWN_FRAMES else frames)


def decode_bounded(data: bytes, label: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of encoded audio `data`, at most `max_seconds` of them.

    Raises `AudioError`: ``audio_too_long`` when the header or the samples pass
    `max_seconds` (before decoding, or at the first block past it), ``invalid_audio`` when the data
    cannot be decoded."""
    import soundfile

    too_long = (
        f"audio {label}: longer than the {max_seconds:g} s this encoder takes; cut the clip",
        "audio_too_long",
    )
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            header = read_header(sound, label)
            if header.seconds is not None and header.seconds > max_seconds:
                raise AudioError(
                    f"audio {label}: {header.seconds:.1f} s is longer than the {max_seconds:g} s this "
                    "encoder takes; cut the clip",
                    "audio_too_long",
                )
            limit = int(max_seconds * header.rate) + 1  # one frame past the limit proves it too long
            blocks, frames = [], 0
            while frames < limit:
                block = sound.read(min(BLOCK_FRAMES, limit - frames), dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0])
                frames += len(block)
    except AudioError:
        raise
    except _errors() as exc:
        raise AudioError(f"audio {label}: could not be decoded ({_reason(exc)})", "invalid_audio") from None
    if frames >= limit:
        raise AudioError(*too_long)
    samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    return samples, header.rate

"""A request's ``input_audio`` parts turned into 16 kHz samples under the server's rules (`AudioIntake`).

Audio is the cheapest thing to send and the dearest to decode: a 673 KB FLAC holds an hour of stereo
silence. So, in this order and before any sample is decoded: a model without an audio encoder refuses
every clip; too many clips, an unknown format or too many bytes are refused; then each clip's header is
read and an over-long clip refused (`metalm.data.audio_header`), and the rest is decoded in blocks that
stop at the length limit. At most ``max_concurrent_audio_decodes`` clips decode at once, server-wide, so
the memory audio decoding holds is bounded whatever the load (docs/serving.md, "Memory bounds")."""

from __future__ import annotations

import threading
from typing import Any

from starlette.concurrency import run_in_threadpool

from metalm.data.audio import AudioError, decode_base64_audio, load_audio
from metalm.serving.errors import APIError, refuse_over_limit
from metalm.serving.schemas import InputAudio, Message
from metalm.serving.settings import ServerSettings

__all__ = ["AUDIO_FORMATS", "AudioIntake"]

# OpenAI's input_audio formats; the clip's own header is what is decoded.
AUDIO_FORMATS = ("wav", "mp3")


class AudioIntake:
    """Decodes the speech clips of requests for a model whose audio encoders take `max_seconds` (None:
    the model has no audio encoder, and every clip is refused unread)."""

    def __init__(self, settings: ServerSettings, max_seconds: float | None) -> None:
        self.settings = settings
        self.max_seconds = None if max_seconds is None else min(settings.max_audio_seconds, max_seconds)
        # A thread semaphore (decodes run in worker threads): it bounds the decode buffers alive at once.
        self._decodes = threading.BoundedSemaphore(max(1, settings.max_concurrent_audio_decodes))

    def check(self, messages: list[Message]) -> list[tuple[int, int, InputAudio]]:
        """(message, part, clip) of every clip, once the cheap refusals have passed (nothing decoded)."""
        clips = [(i, j, clip) for i, msg in enumerate(messages) for j, clip in msg.audio_clips()]
        if clips and self.max_seconds is None:
            i, j, _ = clips[0]
            raise APIError(
                400, "this model has no audio encoder, so it cannot read input_audio; send text or images",
                param=f"messages[{i}].content[{j}]", code="audio_not_supported",
            )  # fmt: skip
        refuse_over_limit(clips, self.settings.max_audio_clips, "audio clips", "too_many_audio_clips")
        for i, j, clip in clips:
            self._check_clip(clip, f"messages[{i}].content[{j}]")
        return clips

    def _check_clip(self, clip: InputAudio, where: str) -> None:
        if clip.format not in AUDIO_FORMATS:
            raise APIError(
                400, f"input_audio format {clip.format!r} is not supported; use one of {', '.join(AUDIO_FORMATS)}",
                param=f"{where}.input_audio.format", code="invalid_audio_format",
            )  # fmt: skip
        if len(clip.data) > self.settings.max_audio_bytes * 4 // 3 + 4:  # before decoding the base64
            raise APIError(
                400, f"audio over {self.settings.max_audio_bytes:,} bytes", param=f"{where}.input_audio.data",
                code="audio_too_large",
            )  # fmt: skip

    def _decode(self, clip: InputAudio, where: str) -> Any:
        """16 kHz samples of one checked clip, or an OpenAI-shaped 400 naming the part."""
        assert self.max_seconds is not None
        try:
            data = decode_base64_audio(clip.data, where)
            with self._decodes:
                return load_audio(
                    data, name=where, max_bytes=self.settings.max_audio_bytes, max_seconds=self.max_seconds
                )
        except AudioError as err:
            raise APIError(400, str(err), param=f"{where}.input_audio.data", code=err.code) from None

    async def decode(self, messages: list[Message]) -> list[list[Any]]:
        """The decoded clips of each message (decoding is CPU work: off the event loop)."""
        decoded: list[list[Any]] = [[] for _ in messages]
        for i, j, clip in self.check(messages):
            decoded[i].append(await run_in_threadpool(self._decode, clip, f"messages[{i}].content[{j}]"))
        return decoded

"""What a request to the engine is made of, and what comes back: sampling settings, chat turns, the prepared
prompt, completions, streamed events, and the two refusals of the scheduler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from metalm.data.segments import Sample

__all__ = [
    "ChatMessage",
    "Completion",
    "Demonstration",
    "GenerationResult",
    "JobTimeout",
    "Prompt",
    "QueueFull",
    "SamplingParams",
    "StreamEvent",
]


class QueueFull(RuntimeError):
    """The engine already holds its maximum number of pending jobs."""


class JobTimeout(TimeoutError):
    """A job's deadline passed before it could start."""


@dataclass
class SamplingParams:
    """How to generate. ``temperature=0`` is greedy decoding; ``n`` independent choices per prompt;
    ``num_beams > 1`` runs beam search (direct calls only, no streaming); ``seed`` makes sampling
    reproducible (its own generator in the running batch; a batch of its own under dynamic batching)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    n: int = 1
    num_beams: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0) or math.isnan(float(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.n > self.num_beams:
            raise ValueError(f"n ({self.n}) cannot exceed num_beams ({self.num_beams}) in beam search")

    @property
    def exclusive(self) -> bool:
        """Runs in a `generate` call of its own under dynamic batching (beam search, or a seed)."""
        return self.num_beams > 1 or self.seed is not None


@dataclass
class ChatMessage:
    """One chat turn: ``role`` is system / user / assistant; ``images`` are PIL images, paths, bytes or data
    URLs, ``audio`` speech clips (16 kHz sample arrays, paths, bytes or data URLs): user turns only."""

    role: str
    text: str = ""
    images: list[Any] = field(default_factory=list)
    audio: list[Any] = field(default_factory=list)


@dataclass
class Demonstration:
    """A solved example shown before a request (in-context learning): its ``question`` (None: an image-alone
    caption request), ``images`` (as `ChatMessage`'s) and ``answer``, laid out as the request is and closed
    by EOS, as k-shot evaluation and in-context training rows lay out theirs."""

    answer: str
    question: str | None = None
    images: list[Any] = field(default_factory=list)


@dataclass
class Prompt:
    """A prompt ready for the model: its segments and the decoder positions they occupy."""

    sample: Sample
    num_tokens: int


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (token budget or time limit), "cancelled"


@dataclass
class GenerationResult:
    completions: list[Completion]
    prompt_tokens: int
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


@dataclass
class StreamEvent:
    """A piece of streamed output: new ``text`` for choice ``index``; ``finish_reason`` is set on the
    choice's last event."""

    index: int
    text: str = ""
    finish_reason: str | None = None

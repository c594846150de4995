"""Inference and serving: the `Engine` (prompts, generation, streaming, batching), the OpenAI-compatible
server (`metalm.serving.server.create_app`) and the CLI commands (`metalm.serving.cli`)."""

from metalm.serving.engine import Engine
from metalm.serving.jobs import Job
from metalm.serving.request_types import (
    ChatMessage,
    Completion,
    Demonstration,
    GenerationResult,
    JobTimeout,
    Prompt,
    QueueFull,
    SamplingParams,
    StreamEvent,
)

__all__ = [
    "ChatMessage",
    "Completion",
    "Demonstration",
    "Engine",
    "GenerationResult",
    "Job",
    "JobTimeout",
    "Prompt",
    "QueueFull",
    "SamplingParams",
    "StreamEvent",
]

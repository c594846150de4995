"""Inference and serving: the `Engine` (prompts, generation, streaming, dynamic batching), the
OpenAI-compatible server (`metalm.serving.server.create_app`) and the CLI commands (`metalm.serving.cli`)."""

from metalm.serving.engine import (
    ChatMessage,
    Completion,
    Engine,
    GenerationResult,
    Job,
    JobTimeout,
    Prompt,
    QueueFull,
    SamplingParams,
    StreamEvent,
)

__all__ = [
    "ChatMessage",
    "Completion",
    "Engine",
    "GenerationResult",
    "Job",
    "JobTimeout",
    "Prompt",
    "QueueFull",
    "SamplingParams",
    "StreamEvent",
]

"""The inference engine: a saved MetaLM loaded once, with the rooms that serve it.

`Engine` joins four modules, one job each:

- :mod:`metalm.serving.request_types`: what a request is made of and what comes back (`SamplingParams`,
  `ChatMessage`, `Prompt`, `Completion`, `GenerationResult`, `StreamEvent`, `QueueFull`, `JobTimeout`);
- :mod:`metalm.serving.prompts`: `PromptBuilder`, requests in the layouts the model was trained on, tokenized
  once into a `Prompt`;
- :mod:`metalm.serving.generation`: `JobRunner`, which generates jobs on the model (the running batch of
  :mod:`metalm.serving.continuous`, one ``model.generate`` call, or beam search), and `ChoiceRow`, the
  per-choice decoding (stop strings, budgets, streamed text);
- :mod:`metalm.serving.scheduler`: `Scheduler`, the queue and the worker thread that batches submitted jobs
  (continuous or dynamic batching); a job in flight is a :class:`~metalm.serving.jobs.Job`, the handle its
  caller reads events and results from.

Direct calls (:meth:`Engine.generate`, :meth:`Engine.stream`, :meth:`Engine.start_job`) run a job alone in
the calling or a background thread; :meth:`Engine.submit` queues it for the worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from metalm.data.processor import MetaLMProcessor
from metalm.modalities import encoders_of_field
from metalm.model.loading import CHECKPOINT_PATTERN, check_config
from metalm.serving.generation import JobRunner
from metalm.serving.jobs import Job
from metalm.serving.prompts import PromptBuilder
from metalm.serving.request_types import ChatMessage, GenerationResult, Prompt, SamplingParams, StreamEvent
from metalm.serving.scheduler import Scheduler
from metalm.serving.vllm_process import VLLMSettings

__all__ = ["Engine"]


# The folder names training writes for every run (`final`, `checkpoint-N/model`): they say nothing alone.
_GENERIC_FOLDERS = ("final", "model")


def served_name(directory: str | Path) -> str:
    """The model's name when none is given: the folder's, led by the run folder's where the folder is one
    that every run has (``runs/quickstart/final`` -> ``quickstart/final``,
    ``runs/quickstart/checkpoint-600/model`` -> ``quickstart/checkpoint-600/model``)."""
    path = Path(directory).resolve()
    parts = path.parts
    keep = 1
    while keep < len(parts) and (parts[-keep] in _GENERIC_FOLDERS or CHECKPOINT_PATTERN.match(parts[-keep])):
        keep += 1
    # A folder at the file system's root keeps its own name, not the root's ("/", "C:\\").
    return "/".join(parts[-keep:]) if parts[-keep] != path.anchor else "/".join(parts[-keep + 1 :])


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    """A loaded MetaLM with its processor: prompt building, direct generation and batched serving.

    Args:
        model, processor: a `MetaLMForCausalLM` and its `MetaLMProcessor`.
        name: the model id the server reports.
        device: where the model runs (moved there once).
        max_batch_size: most rows (choices) decoded together.
        batch_wait_ms: how long the batch worker waits for more jobs after the first one arrives.
        max_pending: most jobs queued or running at once; :meth:`submit` raises `QueueFull` beyond it.
        batching: ``"continuous"`` (default): jobs join and leave one running batch between decode steps
            (:mod:`metalm.serving.continuous`); ``"dynamic"``: each collected batch is one `generate` call.
            A decoder whose cache cannot be joined row by row gets ``"dynamic"`` (``batching_note`` says why).
        encode_max_tokens: user text longer than this (in encoder tokens) goes to the decoder instead of the
            text encoder (default: the encoder's own span limit).
        chat_history: ``"latest"`` (default): a conversation is answered from its last user turn (with the
            images still in view) in the layout the model trained on; ``"demonstrations"``: earlier turns
            stay in the prompt as few-shot demonstrations (:func:`metalm.data.layouts.chat_layout_parts`).
        vllm: decode in vLLM instead (`metalm.serving.vllm_backend`): the prompts and their embeddings are
            built here, a vLLM server (started from these settings, or reached at their ``url``) decodes;
            ``batching`` and ``batch_wait_ms`` then do not apply (vLLM batches continuously).
        feature_cache_mb: memory for the outputs of the encoders' frozen parts, per image and text span
            (`metalm.model.feature_cache`, in memory only, least recently used out): an image asked about
            again, and the demonstrations shown before every request, are not encoded again. 0: off (a
            model that already has a cache attached keeps it).

    Its parts: ``prompts`` (`PromptBuilder`), ``runner`` (`JobRunner`: the model lock, ``batch_sizes``) and
    ``scheduler`` (`Scheduler`: the queue and its limits, which may be changed while it runs);
    ``demonstrations``, when set (`metalm.serving.demonstrations.attach_demonstrations`), goes before every
    chat request.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: MetaLMProcessor,
        *,
        name: str = "metalm",
        device: str | torch.device | None = None,
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
        max_pending: int = 64,
        batching: str = "continuous",
        encode_max_tokens: int | None = None,
        chat_history: str = "latest",
        vllm: VLLMSettings | None = None,
        feature_cache_mb: float = 256,
    ) -> None:
        # Checked first: a bad setting is refused at start-up, before the model moves anywhere.
        if not feature_cache_mb >= 0:
            raise ValueError(f"feature_cache_mb must be 0 (off) or more, got {feature_cache_mb}")
        self.prompts = PromptBuilder(
            processor, model.config, encode_max_tokens=encode_max_tokens, chat_history=chat_history
        )
        self.demonstrations: Any = None  # a DemonstrationPool shown before every chat request (--demos)
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.config = model.config
        self.name = name
        self.feature_cache = None
        if feature_cache_mb > 0:
            from metalm.model.feature_cache import cache_features

            self.feature_cache = cache_features(self.model, processor, False, memory_mb=feature_cache_mb)
        max_batch_size, max_pending = max(1, int(max_batch_size)), max(1, int(max_pending))
        if vllm is not None:  # the decoder runs in vLLM (metalm.serving.vllm_backend)
            from metalm.serving.vllm_backend import VLLMRunner, VLLMScheduler

            self.runner = VLLMRunner(self.model, processor, self.device, vllm, max_batch_size=max_batch_size)
            self.scheduler = VLLMScheduler(
                self.runner, max_batch_size=max_batch_size, max_pending=max_pending
            )
            return
        self.runner = JobRunner(self.model, processor, self.device, batching)
        self.scheduler = Scheduler(
            self.runner,
            max_batch_size=max_batch_size,
            batch_wait=max(0.0, float(batch_wait_ms)) / 1000.0,
            max_pending=max_pending,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Load a saved model folder (config.json + safetensors + processor files) once."""
        import metalm

        metalm.register()  # the Auto classes (idempotent)

        directory = Path(directory)
        check_config(directory)  # one line for a broken config, before transformers reads it
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        load_kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)
        processor = MetaLMProcessor.from_pretrained(directory, config=model.config)
        return cls(model, processor, name=name or served_name(directory), device=device, **kwargs)

    # --- facts ----------------------------------------------------------------------------------------
    @property
    def batching(self) -> str:
        """The batching that runs: ``"continuous"``, ``"dynamic"`` or ``"vllm"`` (vLLM's own)."""
        return self.runner.batching

    @property
    def batching_note(self) -> str | None:
        """Why the batching that runs is not the one asked for (None: it is)."""
        return self.runner.batching_note

    @property
    def chat_history(self) -> str:
        return self.prompts.chat_history

    @property
    def layouts(self) -> Any:
        """The request layouts the model was trained on."""
        return self.prompts.layouts

    @property
    def context_length(self) -> int | None:
        """The decoder's maximum number of positions (prompt + answer), if its config states one."""
        return self.runner.context_length

    @property
    def max_audio_seconds(self) -> float | None:
        """The longest clip the model's audio encoders take (None: it has none, so clips are refused later)."""
        specs = [self.config.encoder_spec(n) for n in encoders_of_field(self.config, "audio")]
        return min((float(s["max_seconds"]) for s in specs), default=None)

    @property
    def has_text_encoder(self) -> bool:
        return bool(self.prompts.text_encoders)

    @property
    def has_vision_encoder(self) -> bool:
        return bool(self.prompts.vision_encoders)

    @property
    def image_size(self) -> int | None:
        """The side of the square images the (first) vision encoder reads, if the model has one."""
        if not self.prompts.vision_encoders:
            return None
        preprocessor = self.processor.preprocessors.get(self.prompts.vision_encoders[0])
        return preprocessor.size if preprocessor is not None else None

    @property
    def pending(self) -> int:
        """Submitted jobs not yet finished."""
        return self.scheduler.pending

    # --- prompts (metalm.serving.prompts) -------------------------------------------------------------
    def text_parts(self, prompt: str, images: Iterable[Any] = (), *, encode: bool | None = None) -> list[Any]:
        """A raw prompt: images first, then the prompt text (`PromptBuilder.text_parts`)."""
        return self.prompts.text_parts(prompt, images, encode=encode)

    def chat_parts(
        self, messages: Sequence[ChatMessage | dict], *, encode: bool | None = None, seed: int | None = None
    ) -> list[Any]:
        """A conversation in the model's trained layouts (`PromptBuilder.chat_parts`), after the
        demonstrations of ``self.demonstrations`` (a `DemonstrationPool`, `metalm chat/serve --demos`) when
        it is set; ``seed`` is their random draw's."""
        parts = self.prompts.chat_parts(messages, encode=encode)
        if self.demonstrations is None:
            return parts
        shown = self.demonstrations.choose(parts, seed)
        return self.prompts.demonstration_parts(shown, encode=encode) + parts

    def layout_parts(
        self, kind: str, images: Iterable[Any] = (), *, encode: bool | None = None, **fields: str
    ) -> list[Any]:
        """One request in the model's trained layout `kind` (`PromptBuilder.layout_parts`)."""
        return self.prompts.layout_parts(kind, images, encode=encode, **fields)

    def prepare(self, prompt: Prompt | str | Sequence[Any]) -> Prompt:
        """Tokenize / preprocess a prompt once (`PromptBuilder.prepare`); raises `InputError` on bad input."""
        return self.prompts.prepare(prompt)

    # --- direct calls ---------------------------------------------------------------------------------
    def _new_job(self, prompt: Any, params: SamplingParams | None, **kwargs: Any) -> Job:
        return Job(self.prepare(prompt), params or SamplingParams(), **kwargs)

    def generate(self, prompt: Any, params: SamplingParams | None = None) -> GenerationResult:
        """Generate directly in the calling thread (no batching with other requests)."""
        job = self._new_job(prompt, params)
        self.runner.run([job])
        return job.result()

    def start_job(self, prompt: Any, params: SamplingParams | None = None) -> Job:
        """Start generating directly in a background thread (no batching with other requests); read the
        job's `events()` as they arrive, then its `result()`."""
        job = self._new_job(prompt, params)
        job._thread = threading.Thread(
            target=self.runner.run, args=([job],), daemon=True, name=f"metalm-job-{job.id}"
        )
        job._thread.start()
        return job

    def stream(self, prompt: Any, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Generate directly and yield `StreamEvent`s as tokens arrive (beam search yields at the end).
        Closing the iterator early cancels the generation."""
        job = self.start_job(prompt, params)
        try:
            yield from job.events()
        finally:
            job.cancel()
            job._join()

    # --- batched serving (metalm.serving.scheduler) ---------------------------------------------------
    def start(self) -> Engine:
        """Start the batch worker thread (idempotent)."""
        self.scheduler.start()
        return self

    def close(self) -> None:
        """Stop the worker; queued jobs fail. A vLLM server the engine started stops too."""
        self.scheduler.close()
        self.runner.close()

    def submit(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        deadline: float | None = None,
        on_event: Callable[[Any], None] | None = None,
    ) -> Job:
        """Queue a job for the batch worker. Raises `QueueFull` when `max_pending` jobs are in flight,
        `InputError` for a bad prompt. ``deadline`` is a `time.monotonic()` time: a job still queued then
        fails with `JobTimeout`, a running one ends its answers with finish_reason "length"."""
        return self.scheduler.submit(self._new_job(prompt, params, deadline=deadline, on_event=on_event))

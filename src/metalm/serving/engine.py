"""Inference engine: load a saved MetaLM once, build prompts from chat messages, generate and stream.

Prompt layouts (chat)
---------------------
A model answers in the layouts it was trained on, which the trainer saves in its config
(``prompt_layouts``, :mod:`metalm.data.layouts`). A conversation becomes one request in them::

    [BOS] <enc(system)> <image>... <enc("question: " + user text)> answer:

- the last *user* turn is the request; when it has no image, the images of the latest user turn that had
  some go with it (a follow-up is about the picture still in view). Earlier turns are left out by default
  (``chat_history="latest"``): no built-in stream trains conversations, and a model shown its earlier
  answers copies them. ``chat_history="demonstrations"`` keeps them, each assistant answer closed by EOS
  after its request, as few-shot demonstrations (``... answer: red [EOS] <enc("question: ...")> answer:``);
- a user turn with text is a ``vqa`` request: its text fills the layout's encoder template (through the
  text encoder when the model has one and the rendered text fits ``processor.span_limit``; otherwise it is
  plain decoder text), followed by the layout's decoder prompt (``answer:``);
- a user turn with images only is a ``caption`` request (by default the images alone, as image-text pairs
  are trained);
- images of a turn come first in that turn, each through the vision encoder (``ImageInput``);
- system text, which no training stream has, is read as encoded context before the request.

A raw prompt (``metalm generate --prompt``) is ``[BOS] <images...> <enc(prompt)>`` — the paper's zero-shot
layout; ``--question`` uses the ``vqa`` layout and an image with neither uses the ``caption`` layout.

Generation
----------
Requests run as *jobs*. Every choice of every job is one row of a left-padded batch decoded with the KV cache
(encoder features are computed once, in the prefill, which computes logits for the last position only). Rows
carry their own temperature / top-p, token budget, stop strings, deadline and cancellation (`_Row`, which
also emits the streamed text). The batch worker (:meth:`Engine.submit`) batches concurrent requests in one
of two ways (``batching``):

- ``"continuous"`` (default): one running batch (:mod:`metalm.serving.continuous`); between decode steps
  queued jobs are prefilled and join it, finished rows leave it. Direct calls run the same loop alone.
- ``"dynamic"``: take the first queued job, wait ``batch_wait_ms`` for more (up to ``max_batch_size`` rows),
  run them through one ``model.generate`` call (per-row logits processor and stopping criterion). Also the
  fallback for decoders whose cache cannot be joined row by row (sliding-window layers, e.g. Gemma-3).

Beam-search jobs (and seeded ones under ``dynamic`` batching) run alone through ``model.generate``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from metalm.data.images import ImageError, load_image
from metalm.data.layouts import chat_layout_parts, check_chat_history, layouts_of
from metalm.data.processor import Encode, ImageInput, InputError, MetaLMProcessor, continuation_pieces
from metalm.data.segments import Sample, TextSegment, sample_length, to_device
from metalm.model.loading import check_config
from metalm.serving.continuous import RowSampling, RunningBatch, continuous_unsupported

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

logger = logging.getLogger("metalm.serving")


class QueueFull(RuntimeError):
    """The engine already holds its maximum number of pending jobs."""


class JobTimeout(TimeoutError):
    """A job's deadline passed before it could start."""


# --- requests -----------------------------------------------------------------------------------------
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


_END = object()  # marks the end of a job's event stream


class Job:
    """One request in flight. Consume it with :meth:`events` (streaming) or :meth:`result` (blocking);
    ``on_event`` (called from the worker thread) replaces the internal queue, e.g. to feed asyncio."""

    _ids = itertools.count()

    def __init__(
        self,
        prompt: Prompt,
        params: SamplingParams,
        *,
        deadline: float | None = None,
        on_event: Callable[[Any], None] | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.deadline = deadline
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.completions: list[Completion | None] = [None] * params.n
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._counted = False  # holds one of the engine's pending slots (submitted, not yet released)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._queue: queue.Queue | None = None if on_event else queue.Queue()
        self._on_event = on_event or self._queue.put  # type: ignore[union-attr]

    # consumer side
    def _join(self) -> None:
        # A direct job's thread finishes right after the job; wait for it so that the interpreter never exits
        # while torch is still running in it.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Streamed events until the job ends; raises the job's error, if any, at the end."""
        if self._queue is None:
            raise RuntimeError("this job delivers its events to on_event")
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                break
            yield item
        self._join()
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        self._join()
        if self.error is not None:
            raise self.error
        return GenerationResult(
            completions=[c for c in self.completions if c is not None],
            prompt_tokens=self.prompt.num_tokens,
            seconds=(self.finished or time.monotonic()) - self.created,
        )

    # producer side
    def _emit(self, event: StreamEvent) -> None:
        self._on_event(event)

    def _finish_choice(self, index: int, completion: Completion) -> None:
        self.completions[index] = completion
        self._emit(StreamEvent(index, "", completion.finish_reason))
        if all(c is not None for c in self.completions):
            self._end()

    def _fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self.error = error
            self._end()

    def _end(self) -> None:
        if not self._done.is_set():
            self.finished = time.monotonic()
            self._done.set()
            self._on_event(_END)

    @staticmethod
    def is_end(item: Any) -> bool:
        return item is _END


# --- per-row decoding ---------------------------------------------------------------------------------
class _Row:
    """One choice being generated: collects tokens, decodes them, applies stop strings and emits deltas.

    Streamed text holds back any tail that could still become a stop string, so a stop string never
    reaches the client."""

    def __init__(
        self, job: Job, index: int, max_new_tokens: int, decode: Callable[[list[int]], str], eos: set[int]
    ) -> None:
        self.job, self.index = job, index
        self.max_new_tokens = max_new_tokens
        self.stop = list(job.params.stop)
        self.decode, self.eos = decode, eos
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = ""
        self.done = False

    def push(self, token: int) -> None:
        if self.done:
            return
        if token in self.eos:
            return self.finish("stop")
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        if self.stop:
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                return self.finish("stop")
        self._emit(self._safe_text())
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
        elif self.job.cancelled:
            self.finish("cancelled")
        elif self.job.deadline is not None and time.monotonic() > self.job.deadline:
            self.finish("length")  # the time limit ends the answer like the token budget does

    def _safe_text(self) -> str:
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[: len(self.text) - hold]

    def _emit(self, text: str) -> None:
        # Decoding a longer token list can rewrite the tail (WordPiece joins, space clean-up); only text
        # that extends what was already sent can be streamed.
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.job._emit(StreamEvent(self.index, text[len(self.emitted) :]))
            self.emitted = text

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self._emit(self.text)
        self.job._finish_choice(self.index, Completion(self.text, list(self.tokens), reason))


class _RowTracker(StoppingCriteria):
    """Feeds each step's new tokens to the rows and tells `generate` which rows are finished.

    A stopping criterion rather than a `BaseStreamer`: transformers calls the streamer *after* the stopping
    decision, and the decision needs the decoded text (stop strings)."""

    def __init__(self, rows: list[_Row], prompt_width: int) -> None:
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_width:
            new = input_ids[:, -1].tolist()
            for row, token in zip(self.rows, new):
                row.push(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


_RowSampling = RowSampling  # the per-row temperature / top-p processor, shared with the running batch


# --- the engine ---------------------------------------------------------------------------------------
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    """A loaded MetaLM with its processor: prompt building, direct generation and dynamic batching.

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
    ) -> None:
        self.chat_history = check_chat_history(chat_history)  # refused at start-up, not at the first chat
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.config = model.config
        self.name = name
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.max_pending = max(1, int(max_pending))
        self.encode_max_tokens = encode_max_tokens
        self._text_encoders = self.config.encoders_of_kind("text")
        self._vision_encoders = self.config.encoders_of_kind("vision")
        self.layouts = layouts_of(self.config)  # the request layouts the model was trained on
        self._eos = {i for i in self._eos_ids() if i is not None}
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads
        self._model_lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        # Rows per batched generate call (dynamic), or in the running batch after each join (continuous),
        # for monitoring and benchmarks.
        self.batch_sizes: list[int] = []
        self.batching, self.batching_note = self._choose_batching(batching)
        self._begin_suppress = continuation_pieces(self.processor.tokenizer) or []

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
        return cls(model, processor, name=name or directory.resolve().name, device=device, **kwargs)

    def _choose_batching(self, batching: str) -> tuple[str, str | None]:
        if batching not in ("continuous", "dynamic"):
            raise ValueError(f"batching must be 'continuous' or 'dynamic', got {batching!r}")
        reason = continuous_unsupported(self.model) if batching == "continuous" else None
        if reason is None:
            return batching, None
        note = f"continuous batching is not available for this model: {reason}; using dynamic batching"
        logger.warning(note)
        return "dynamic", note

    # --- facts ----------------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int | None]:
        ids: list[int | None] = [self.processor.eos_token_id]
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += list(gen_eos) if isinstance(gen_eos, list | tuple) else [gen_eos]
        return ids

    @property
    def context_length(self) -> int | None:
        """The decoder's maximum number of positions (prompt + answer), if its config states one."""
        return self.config.context_length()

    @property
    def max_audio_seconds(self) -> float | None:
        """The longest clip the model's audio encoders take (None: it has none, so clips are refused later)."""
        specs = [self.config.encoder_spec(n) for n in self.config.encoders_of_kind("audio")]
        return min((float(s["max_seconds"]) for s in specs), default=None)

    @property
    def has_text_encoder(self) -> bool:
        return bool(self._text_encoders)

    @property
    def has_vision_encoder(self) -> bool:
        return bool(self._vision_encoders)

    @property
    def image_size(self) -> int | None:
        """The side of the square images the (first) vision encoder reads, if the model has one."""
        if not self._vision_encoders:
            return None
        preprocessor = self.processor.image_processors.get(self._vision_encoders[0])
        return preprocessor.size if preprocessor is not None else None

    @property
    def pending(self) -> int:
        return self._pending

    # --- prompts --------------------------------------------------------------------------------------
    def _encodable(self, text: str, encode: bool | None) -> bool:
        if encode is False or not self._text_encoders:
            return False
        with self._tok_lock:
            return self.processor.fits_encoder(self._text_encoders[0], text, self.encode_max_tokens)

    def _text_part(self, text: str, encode: bool | None) -> str | Encode:
        if self._encodable(text, encode):
            return Encode(text, encoder=self._text_encoders[0])
        return text

    def _vision_for(self, images: Sequence[Any]) -> str | None:
        """The vision encoder that reads `images` (None when there are none); an error if the model has none."""
        if not images:
            return self._vision_encoders[0] if self._vision_encoders else None
        if not self._vision_encoders:
            raise InputError("this model has no vision encoder, so it cannot read images")
        return self._vision_encoders[0]

    def _image_part(self, image: Any) -> ImageInput:
        return ImageInput(image, encoder=self._vision_for([image]))

    def text_parts(self, prompt: str, images: Iterable[Any] = (), *, encode: bool | None = None) -> list[Any]:
        """A raw prompt: images first, then the prompt text (encoded when it fits, unless ``encode=False``)."""
        parts: list[Any] = [self._image_part(img) for img in images]
        if prompt and prompt.strip():
            parts.append(self._text_part(prompt, encode))
        if not parts:
            raise InputError("empty prompt: give some text or an image")
        return parts

    def chat_parts(self, messages: Sequence[ChatMessage | dict], *, encode: bool | None = None) -> list[Any]:
        """A conversation in the layouts the model was trained on (module docstring) as a list of parts;
        `None` entries mark an EOS token."""
        msgs = [m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in messages]
        if not msgs:
            raise InputError("messages: at least one message is needed")
        turns: list[dict[str, Any]] = []
        context: list[str] = []
        for i, msg in enumerate(msgs):
            role = {"developer": "system"}.get(msg.role, msg.role)
            if role not in ("system", "user", "assistant"):
                raise InputError(
                    f"messages[{i}]: role {msg.role!r} is not supported (system, user, assistant)"
                )
            text = (msg.text or "").strip()
            if role == "system":
                if msg.images or msg.audio:
                    raise InputError(f"messages[{i}]: system messages cannot carry images or audio")
                context += [text] if text else []
                continue
            if role == "assistant" and (msg.images or msg.audio):
                raise InputError(f"messages[{i}]: assistant messages cannot carry images or audio")
            if role == "user" and not text and not msg.images and not msg.audio:
                raise InputError(f"messages[{i}]: empty user message")
            turns.append({"role": role, "text": text, "images": list(msg.images), "audio": list(msg.audio)})
        if not turns or turns[-1]["role"] != "user":
            raise InputError("messages: the last message must come from the user")
        parts: list[Any] = [self._text_part(" ".join(context), encode)] if context else []
        return parts + chat_layout_parts(
            turns,
            self.layouts,
            text_encoder=lambda text: self._text_encoders[0] if self._encodable(text, encode) else None,
            vision_encoder=self._vision_for([img for turn in turns for img in turn["images"]]),
            history=self.chat_history,
        )

    def layout_parts(
        self, kind: str, images: Iterable[Any] = (), *, encode: bool | None = None, **fields: str
    ) -> list[Any]:
        """One request in the model's trained layout `kind` (`vqa`, `caption`, `classification`)."""
        layout = getattr(self.layouts, kind, None)
        if layout is None:
            raise InputError(
                f"unknown layout {kind!r}; this model has {', '.join(type(self.layouts).model_fields)}"
            )
        rendered = layout.template.format_map(fields) if layout.template else ""
        encoder = self._text_encoders[0] if rendered.strip() and self._encodable(rendered, encode) else None
        images = list(images)
        parts = layout.parts(images, text_encoder=encoder, vision_encoder=self._vision_for(images), **fields)
        if not parts:
            raise InputError(f"empty {kind} request: give some text or an image")
        return parts

    def prepare(self, prompt: Prompt | str | Sequence[Any]) -> Prompt:
        """Tokenize / preprocess a prompt once: a `Prompt`, a raw string, a list of `ChatMessage`s (or dicts),
        or a list of processor parts (`None` inserts an EOS token). Raises `InputError` on bad input."""
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            parts = self.text_parts(prompt)
        elif prompt and all(isinstance(m, ChatMessage | dict) for m in prompt):
            parts = self.chat_parts(prompt)
        else:
            parts = list(prompt)
        groups: list[list[Any]] = [[]]
        for part in parts:
            if part is None:
                groups.append([])
            else:
                groups[-1].append(part)
        sample: Sample = []
        with self._tok_lock:
            for k, group in enumerate(groups):
                if k > 0 and self.processor.eos_token_id is not None:
                    sample.append(TextSegment([self.processor.eos_token_id], loss=False))
                if group:
                    sample += self.processor.build_sample(group, add_bos=(k == 0))
        if not sample:
            raise InputError("empty prompt")
        return Prompt(sample, sample_length(sample, self.config))

    def load_image(
        self, source: Any, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000
    ) -> Image.Image:
        """`metalm.data.images.load_image` with explicit limits; raises `InputError`."""
        try:
            return load_image(source, max_bytes=max_bytes, max_pixels=max_pixels)
        except ImageError as err:
            raise InputError(str(err)) from err

    # --- generation -----------------------------------------------------------------------------------
    def _max_new_tokens(self, prompt: Prompt, params: SamplingParams) -> int:
        limit = params.max_new_tokens
        if self.context_length is not None:
            limit = min(limit, self.context_length - prompt.num_tokens)
        if limit < 1:
            raise InputError(
                f"the prompt takes {prompt.num_tokens} positions, the model's whole context "
                f"({self.context_length}); shorten the conversation"
            )
        return limit

    def _generation_kwargs(self, do_sample: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "pad_token_id": self.processor.pad_token_id,
            "eos_token_id": sorted(self._eos) or None,
        }
        pieces = continuation_pieces(self.processor.tokenizer)
        if pieces:  # an answer starts a new word: never with a WordPiece continuation piece ("##l")
            kwargs["begin_suppress_tokens"] = pieces
        if do_sample:
            # Sampling is done by our per-row processor; keep the model's own warpers out of the way.
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        return kwargs

    def _run_jobs(self, jobs: list[Job]) -> None:
        """Generate every choice of `jobs` in one batched `generate` call; results go to the jobs."""
        rows: list[_Row] = []
        now = time.monotonic()
        for job in jobs:
            job.started = now
            limit = self._max_new_tokens(job.prompt, job.params)
            rows += [_Row(job, i, limit, self._decode, self._eos) for i in range(job.params.n)]
        batch = self.processor.collate([r.job.prompt.sample for r in rows], padding_side="left")
        batch.pop("labels", None)
        batch = to_device(batch, self.device)
        width = batch["input_ids"].shape[1]
        temps = [float(r.job.params.temperature) for r in rows]
        do_sample = any(t > 0 for t in temps)
        kwargs = self._generation_kwargs(do_sample)
        if do_sample:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_RowSampling(temps, [float(r.job.params.top_p) for r in rows])]
            )
        seed = jobs[0].params.seed if len(jobs) == 1 else None
        with self._model_lock:
            if seed is not None:
                torch.manual_seed(seed)
            self.batch_sizes.append(len(rows))
            self.model.generate(
                **batch,
                max_new_tokens=max(r.max_new_tokens for r in rows),
                do_sample=do_sample,
                num_beams=1,
                stopping_criteria=StoppingCriteriaList([_RowTracker(rows, width)]),
                **kwargs,
            )
        for row in rows:  # only reached when generate stopped on its own limit
            row.finish("length")

    def _run_beams(self, job: Job) -> None:
        params = job.params
        job.started = time.monotonic()
        limit = self._max_new_tokens(job.prompt, params)
        batch = self.processor.collate([job.prompt.sample], padding_side="left")
        batch.pop("labels", None)
        batch = to_device(batch, self.device)
        kwargs = self._generation_kwargs(params.temperature > 0)
        if params.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_RowSampling([params.temperature] * params.num_beams, [params.top_p] * params.num_beams)]
            )
        with self._model_lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                **batch,
                max_new_tokens=limit,
                num_beams=params.num_beams,
                num_return_sequences=params.n,
                do_sample=params.temperature > 0,
                **kwargs,
            )
        for i, seq in enumerate(out[:, batch["input_ids"].shape[1] :].tolist()):
            row = _Row(job, i, limit, self._decode, self._eos)
            for token in seq:
                row.push(token)
                if row.done:
                    break
            row.finish("length")

    def _run(self, jobs: list[Job]) -> None:
        try:
            if len(jobs) == 1 and jobs[0].params.num_beams > 1:
                self._run_beams(jobs[0])
            elif self.batching == "continuous" and not any(job.params.num_beams > 1 for job in jobs):
                self._run_continuous(jobs)
            else:
                self._run_jobs(jobs)
        except Exception as err:  # noqa: BLE001  (a failed batch must not kill the worker)
            self._fail_jobs(jobs, err)

    def _fail_jobs(self, jobs: Iterable[Job], err: BaseException) -> None:
        """Fail `jobs` with a bad-input error as it is, anything else as a generic error (logged)."""
        jobs = list(jobs)
        if not isinstance(err, InputError):
            logger.error("generation failed for jobs %s", [j.id for j in jobs], exc_info=err)
            err = RuntimeError(f"generation failed: {type(err).__name__}")
        for job in jobs:
            job._fail(err)

    # --- continuous batching --------------------------------------------------------------------------
    def _run_continuous(self, jobs: list[Job]) -> None:
        """Generate `jobs` in a running batch of their own (direct calls): the same decode loop as the
        continuous worker's, with no newcomers."""
        running = RunningBatch(self.model, self._begin_suppress)
        self._join_running(running, jobs)
        while len(running):
            self._step_running(running)

    def _join_running(self, running: RunningBatch, jobs: list[Job]) -> list[Job]:
        """Prefill `jobs` and add their rows to `running`; returns the jobs that already left (failed, or
        finished on their first token). A failed prefill of several jobs is retried job by job, so that
        one bad request fails alone; the running rows go on either way."""
        now = time.monotonic()
        try:
            rows_per_prompt = []
            for job in jobs:
                job.started = now
                limit = self._max_new_tokens(job.prompt, job.params)
                rows_per_prompt.append(
                    [_Row(job, i, limit, self._decode, self._eos) for i in range(job.params.n)]
                )
            batch = self.processor.collate([job.prompt.sample for job in jobs], padding_side="left")
            batch.pop("labels", None)
            batch = to_device(batch, self.device)
            with self._model_lock:
                running.join(batch, rows_per_prompt)
            self.batch_sizes.append(len(running))
        except Exception as err:  # noqa: BLE001
            joined = {id(row.job) for row in running.rows}
            retry = [job for job in jobs if id(job) not in joined and not job.done]
            if len(jobs) == 1 or len(retry) < len(jobs):  # alone, or failed after joining: no retry
                self._fail_jobs(jobs, err)
            else:
                left = [job for one in retry for job in self._join_running(running, [one])]
                return left + running.drop_finished()
        left = running.drop_finished()
        return left + [job for job in jobs if job.done and job not in left]

    def _step_running(self, running: RunningBatch) -> list[Job]:
        """One decode step of `running`; returns the jobs whose rows all left the batch."""
        try:
            with self._model_lock:
                running.step()
        except Exception as err:  # noqa: BLE001  (a failed step fails its rows, never the worker)
            jobs = running.clear()
            self._fail_jobs(jobs, err)
            return jobs
        return running.drop_finished()

    def _decode(self, ids: list[int]) -> str:
        # A SentencePiece/byte-BPE decoder writes the space that joins the answer to the cue before it
        # (Gemma: "answer:" then " red"); every generation here is an answer, shown on its own.
        return self.processor.decode(ids).lstrip()

    def _new_job(self, prompt: Any, params: SamplingParams | None, **kwargs: Any) -> Job:
        return Job(self.prepare(prompt), params or SamplingParams(), **kwargs)

    def generate(self, prompt: Any, params: SamplingParams | None = None) -> GenerationResult:
        """Generate directly in the calling thread (no batching with other requests)."""
        job = self._new_job(prompt, params)
        self._run([job])
        return job.result()

    def start_job(self, prompt: Any, params: SamplingParams | None = None) -> Job:
        """Start generating directly in a background thread (no batching with other requests); read the
        job's `events()` as they arrive, then its `result()`."""
        job = self._new_job(prompt, params)
        job._thread = threading.Thread(
            target=self._run, args=([job],), daemon=True, name=f"metalm-job-{job.id}"
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

    # --- dynamic batching -----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the batch worker thread (idempotent)."""
        if self._worker is None or not self._worker.is_alive():
            self._closing.clear()
            self._worker = threading.Thread(target=self._work, daemon=True, name="metalm-batcher")
            self._worker.start()
        return self

    def close(self) -> None:
        """Stop the worker; queued jobs fail."""
        self._closing.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        while True:
            try:
                self._queue.get_nowait()._fail(RuntimeError("the engine is shutting down"))
            except queue.Empty:
                break

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
        job = self._new_job(prompt, params, deadline=deadline, on_event=on_event)
        if job.params.n > self.max_batch_size:
            raise InputError(f"n={job.params.n} exceeds the batch size {self.max_batch_size}")
        self._max_new_tokens(job.prompt, job.params)  # refuse over-long prompts now, not in the worker
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are already in flight; retry later")
            self._pending += 1
            job._counted = True
        self.start()
        self._queue.put(job)
        return job

    def _release(self, jobs: Iterable[Job]) -> None:
        with self._pending_lock:
            for job in jobs:
                if job._counted:
                    job._counted = False
                    self._pending -= 1

    def _usable(self, job: Job) -> bool:
        if job.cancelled:
            job._fail(RuntimeError("cancelled"))
        elif job.deadline is not None and time.monotonic() > job.deadline:
            job._fail(JobTimeout("the request waited longer than its time limit"))
        else:
            return True
        self._release([job])
        return False

    def _work(self) -> None:
        if self.batching == "continuous":
            self._work_continuous()
        else:
            self._work_dynamic()

    def _work_dynamic(self) -> None:
        held: Job | None = None  # an exclusive job that arrived while a batch was being collected
        while not self._closing.is_set():
            if held is not None:
                first, held = held, None
            else:
                try:
                    first = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            if not self._usable(first):
                continue
            jobs, rows = [first], first.params.n
            if not first.params.exclusive:
                window_end = time.monotonic() + self.batch_wait
                while rows < self.max_batch_size:
                    try:
                        job = self._queue.get(timeout=max(0.0, window_end - time.monotonic()))
                    except queue.Empty:
                        break
                    if not self._usable(job):
                        continue
                    if job.params.exclusive or rows + job.params.n > self.max_batch_size:
                        held = job
                        break
                    jobs.append(job)
                    rows += job.params.n
            try:
                self._run(jobs)
            finally:
                self._release(jobs)
        if held is not None:
            held._fail(RuntimeError("the engine is shutting down"))
            self._release([held])

    def _work_continuous(self) -> None:
        """The continuous worker: between decode steps, queued jobs join the running batch (up to
        `max_batch_size` rows) and finished ones leave. A beam-search job waits at the head
        of the line until the running batch drains, then runs alone; later jobs wait behind it."""
        running = RunningBatch(self.model, self._begin_suppress)
        waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet admitted
        try:
            while not self._closing.is_set():
                newcomers = self._admit(running, waiting)
                if newcomers:
                    self._release(self._join_running(running, newcomers))
                if len(running):
                    self._release(self._step_running(running))
                elif waiting and waiting[0].params.num_beams > 1:
                    job = waiting.popleft()
                    try:
                        self._run([job])
                    finally:
                        self._release([job])
        finally:
            leftover = running.clear() + list(waiting)
            for job in leftover:
                job._fail(RuntimeError("the engine is shutting down"))
            self._release(leftover)

    def _admit(self, running: RunningBatch, waiting: collections.deque[Job]) -> list[Job]:
        """The queued jobs that join the running batch now, in arrival order, while rows are free. Blocks
        briefly for the first job only when nothing is running or waiting."""
        jobs: list[Job] = []
        rows = len(running)
        idle = not rows and not waiting
        while True:
            if not waiting:
                try:
                    job = self._queue.get(timeout=0.2) if idle and not jobs else self._queue.get_nowait()
                except queue.Empty:
                    break
                waiting.append(job)
            job = waiting[0]
            if not self._usable(job):
                waiting.popleft()
                continue
            if job.params.num_beams > 1 or rows + job.params.n > self.max_batch_size:
                break
            jobs.append(waiting.popleft())
            rows += job.params.n
        return jobs

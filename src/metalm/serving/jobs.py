"""A request in flight (`Job`): the handle its caller holds and the stream of events it reads.

The consumer side (:meth:`Job.events`, :meth:`Job.result`, :meth:`Job.cancel`) is used by callers; the
producer side (``_emit``, ``_finish_choice``, ``_fail``) by the rows that generate its choices
(:mod:`metalm.serving.generation`) and by the scheduler (:mod:`metalm.serving.scheduler`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from metalm.serving.request_types import Completion, GenerationResult, Prompt, SamplingParams, StreamEvent

__all__ = ["Job"]

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

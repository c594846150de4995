"""Scheduling: the queue of submitted jobs and the worker thread that batches them onto the model.

The worker batches concurrent jobs one of two ways (the `JobRunner`'s ``batching``):

- ``"continuous"`` (default): one running batch (:mod:`metalm.serving.continuous`); between decode steps
  queued jobs are prefilled and join it, finished rows leave it. A beam-search job waits at the head of the
  line until the running batch drains, then runs alone.
- ``"dynamic"``: take the first queued job, wait ``batch_wait`` seconds for more (up to ``max_batch_size``
  rows), run them through one ``model.generate`` call. Beam-search and seeded jobs run alone.

A job that is cancelled, or whose deadline passed, while it waits is failed instead of run; ``max_pending``
bounds the jobs queued or running (:meth:`Scheduler.submit` raises `QueueFull` beyond it).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterable

from metalm.data.processor import InputError
from metalm.serving.continuous import RunningBatch
from metalm.serving.generation import JobRunner
from metalm.serving.jobs import Job
from metalm.serving.request_types import JobTimeout, QueueFull

__all__ = ["Scheduler"]

_SHUTDOWN = "the engine is shutting down"


class Scheduler:
    """The job queue and its worker thread.

    Args:
        runner: generates the jobs the worker takes.
        max_batch_size: most rows (choices) decoded together.
        batch_wait: dynamic batching: seconds the worker waits for more jobs after the first one arrives.
        max_pending: most jobs queued or running at once.

    The three limits may be changed while the worker runs (the server raises ``max_pending`` to its own
    limit); they are read afresh for every batch.
    """

    def __init__(
        self, runner: JobRunner, *, max_batch_size: int, batch_wait: float, max_pending: int
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.max_pending = max_pending
        self.queue: queue.Queue[Job] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet finished."""
        return self._pending

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._worker is None or not self._worker.is_alive():
            self._closing.clear()
            self._worker = threading.Thread(target=self._work, daemon=True, name="metalm-batcher")
            self._worker.start()

    def close(self) -> None:
        """Stop the worker; queued jobs fail."""
        self._closing.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        while True:
            try:
                self.queue.get_nowait()._fail(RuntimeError(_SHUTDOWN))
            except queue.Empty:
                break

    def submit(self, job: Job) -> Job:
        """Queue `job` for the worker (started if needed). Raises `InputError` for a job that can never run
        (more choices than a batch holds, a prompt that fills the context) and `QueueFull` when
        ``max_pending`` jobs are in flight."""
        if job.params.n > self.max_batch_size:
            raise InputError(f"n={job.params.n} exceeds the batch size {self.max_batch_size}")
        self.runner.max_new_tokens(job.prompt, job.params)  # refuse over-long prompts now, not in the worker
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise QueueFull(f"{self._pending} requests are already in flight; retry later")
            self._pending += 1
            job._counted = True
        self.start()
        self.queue.put(job)
        return job

    def _release(self, jobs: Iterable[Job]) -> None:
        with self._pending_lock:
            for job in jobs:
                if job._counted:
                    job._counted = False
                    self._pending -= 1

    def _run_and_release(self, jobs: list[Job]) -> None:
        try:
            self.runner.run(jobs)
        finally:
            self._release(jobs)

    def _usable(self, job: Job) -> bool:
        """Whether a job taken from the queue should still run; fails (and releases) it otherwise."""
        if job.cancelled:
            job._fail(RuntimeError("cancelled"))
        elif job.deadline is not None and time.monotonic() > job.deadline:
            job._fail(JobTimeout("the request waited longer than its time limit"))
        else:
            return True
        self._release([job])
        return False

    def _work(self) -> None:
        if self.runner.batching == "continuous":
            self._work_continuous()
        else:
            self._work_dynamic()

    # --- dynamic batching -----------------------------------------------------------------------------
    def _work_dynamic(self) -> None:
        held: Job | None = None  # an exclusive job that arrived while a batch was being collected
        while not self._closing.is_set():
            if held is not None:
                first, held = held, None
            else:
                try:
                    first = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            if not self._usable(first):
                continue
            jobs, held = self._collect(first)
            self._run_and_release(jobs)
        if held is not None:
            held._fail(RuntimeError(_SHUTDOWN))
            self._release([held])

    def _collect(self, first: Job) -> tuple[list[Job], Job | None]:
        """The batch that `first` opens: jobs arriving within the wait window, while rows are free; and the
        job that could not join (exclusive, or too many rows), held for the next batch."""
        jobs, rows = [first], first.params.n
        if first.params.exclusive:
            return jobs, None
        window_end = time.monotonic() + self.batch_wait
        while rows < self.max_batch_size:
            try:
                job = self.queue.get(timeout=max(0.0, window_end - time.monotonic()))
            except queue.Empty:
                break
            if not self._usable(job):
                continue
            if job.params.exclusive or rows + job.params.n > self.max_batch_size:
                return jobs, job
            jobs.append(job)
            rows += job.params.n
        return jobs, None

    # --- continuous batching --------------------------------------------------------------------------
    def _work_continuous(self) -> None:
        """Between decode steps, queued jobs join the running batch (up to `max_batch_size` rows) and
        finished ones leave. A beam-search job waits at the head of the line until the running batch
        drains, then runs alone; later jobs wait behind it."""
        running = self.runner.new_running_batch()
        waiting: collections.deque[Job] = collections.deque()  # taken from the queue, not yet admitted
        try:
            while not self._closing.is_set():
                newcomers = self._admit(running, waiting)
                if newcomers:
                    self._release(self.runner.join_running(running, newcomers))
                if len(running):
                    self._release(self.runner.step_running(running))
                elif waiting and waiting[0].params.num_beams > 1:
                    self._run_and_release([waiting.popleft()])
        finally:
            leftover = running.clear() + list(waiting)
            for job in leftover:
                job._fail(RuntimeError(_SHUTDOWN))
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
                    job = self.queue.get(timeout=0.2) if idle and not jobs else self.queue.get_nowait()
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

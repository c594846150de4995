"""Generation: running jobs on the model, and decoding each choice of a job as its tokens arrive.

Every choice of every job is one row of a left-padded batch decoded with the KV cache (encoder features are
computed once, in the prefill, which computes logits for the last position only). Rows carry their own
temperature / top-p, token budget, stop strings, deadline and cancellation (`ChoiceRow`, which also emits
the streamed text). A `JobRunner` generates a group of jobs one of three ways:

- on a running batch (:mod:`metalm.serving.continuous`): prefill them and join the batch
  (:meth:`JobRunner.join_running`), then decode step by step (:meth:`JobRunner.step_running`); the
  continuous scheduler calls these between steps, a direct call runs the same loop alone;
- through one ``model.generate`` call (``batching="dynamic"``, a per-row logits processor and stopping
  criterion); also the fallback for decoders whose cache cannot be joined row by row (sliding-window
  layers, e.g. Gemma-3);
- beam search: alone, through ``model.generate``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from metalm.data.processor import InputError, MetaLMProcessor, continuation_pieces
from metalm.data.segments import to_device
from metalm.serving.continuous import RowSampling, RunningBatch, continuous_unsupported
from metalm.serving.jobs import Job
from metalm.serving.request_types import Completion, Prompt, SamplingParams, StreamEvent

__all__ = ["BATCHING_MODES", "ChoiceRow", "JobRunner", "RowTracker", "choose_batching"]

logger = logging.getLogger("metalm.serving")

BATCHING_MODES = ("continuous", "dynamic")


# --- per-row decoding ---------------------------------------------------------------------------------
class ChoiceRow:
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


class RowTracker(StoppingCriteria):
    """Feeds each step's new tokens to the rows and tells `generate` which rows are finished.

    A stopping criterion rather than a `BaseStreamer`: transformers calls the streamer *after* the stopping
    decision, and the decision needs the decoded text (stop strings)."""

    def __init__(self, rows: list[ChoiceRow], prompt_width: int) -> None:
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_width:
            new = input_ids[:, -1].tolist()
            for row, token in zip(self.rows, new):
                row.push(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


# --- running jobs on the model ------------------------------------------------------------------------
def choose_batching(model: torch.nn.Module, batching: str) -> tuple[str, str | None]:
    """The batching mode that runs for `model` when `batching` is asked for, and why it differs (None: it
    does not). A decoder whose cache cannot be joined row by row gets ``"dynamic"``."""
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be 'continuous' or 'dynamic', got {batching!r}")
    reason = continuous_unsupported(model) if batching == "continuous" else None
    if reason is None:
        return batching, None
    note = f"continuous batching is not available for this model: {reason}; using dynamic batching"
    logger.warning(note)
    return "dynamic", note


class JobRunner:
    """Generates jobs on one model: the forward passes, their rows, and the failures they meet.

    Args:
        model, processor: a `MetaLMForCausalLM` (already on its device) and its `MetaLMProcessor`.
        device: where the model runs (batches are moved there).
        batching: ``"continuous"`` or ``"dynamic"``, as asked for (`choose_batching` may fall back).
    """

    def __init__(
        self, model: torch.nn.Module, processor: MetaLMProcessor, device: torch.device, batching: str
    ) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.eos = {i for i in self._eos_ids() if i is not None}
        self.model_lock = threading.Lock()  # one forward pass at a time, whichever thread asks
        # Rows per batched generate call (dynamic), or in the running batch after each join (continuous),
        # for monitoring and benchmarks.
        self.batch_sizes: list[int] = []
        self.batching, self.batching_note = choose_batching(model, batching)
        # An answer starts a new word: never with a WordPiece continuation piece ("##l").
        self.begin_suppress: list[int] = continuation_pieces(processor.tokenizer) or []

    @property
    def context_length(self) -> int | None:
        return self.model.config.context_length()

    def close(self) -> None:
        """Release what generation holds outside this process (nothing here; the vLLM runner's server)."""

    def _eos_ids(self) -> list[int | None]:
        ids: list[int | None] = [self.processor.eos_token_id]
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += list(gen_eos) if isinstance(gen_eos, list | tuple) else [gen_eos]
        return ids

    def decode(self, ids: list[int]) -> str:
        # A SentencePiece/byte-BPE decoder writes the space that joins the answer to the cue before it
        # (Gemma: "answer:" then " red"); every generation here is an answer, shown on its own.
        return self.processor.decode(ids).lstrip()

    def max_new_tokens(self, prompt: Prompt, params: SamplingParams) -> int:
        """The token budget of `prompt`'s answers: the asked one, cut where the context ends; `InputError`
        when the prompt leaves no room."""
        limit = params.max_new_tokens
        if self.context_length is not None:
            limit = min(limit, self.context_length - prompt.num_tokens)
        if limit < 1:
            raise InputError(
                f"the prompt takes {prompt.num_tokens} positions, the model's whole context "
                f"({self.context_length}); shorten the conversation"
            )
        return limit

    def _row(self, job: Job, index: int, limit: int) -> ChoiceRow:
        return ChoiceRow(job, index, limit, self.decode, self.eos)

    def _start_rows(self, job: Job, now: float) -> list[ChoiceRow]:
        """Mark `job` started and make the rows of its choices."""
        job.started = now
        limit = self.max_new_tokens(job.prompt, job.params)
        return [self._row(job, i, limit) for i in range(job.params.n)]

    def _batch_of(self, jobs: Iterable[Job]) -> dict[str, Any]:
        """The prompts of `jobs` as one left-padded batch on the model's device."""
        batch = self.processor.collate([job.prompt.sample for job in jobs], padding_side="left")
        batch.pop("labels", None)
        return to_device(batch, self.device)

    def run(self, jobs: list[Job]) -> None:
        """Generate every choice of `jobs` (a group the scheduler or a direct call formed); results and
        failures go to the jobs, never out of here."""
        try:
            if len(jobs) == 1 and jobs[0].params.num_beams > 1:
                self._run_beams(jobs[0])
            elif self.batching == "continuous" and not any(job.params.num_beams > 1 for job in jobs):
                self._run_continuous(jobs)
            else:
                self._run_generate(jobs)
        except Exception as err:  # noqa: BLE001  (a failed batch must not kill the worker)
            self.fail_jobs(jobs, err)

    def fail_jobs(self, jobs: Iterable[Job], err: BaseException) -> None:
        """Fail `jobs` with a bad-input error as it is, anything else as a generic error (logged)."""
        jobs = list(jobs)
        if not isinstance(err, InputError):
            logger.error("generation failed for jobs %s", [j.id for j in jobs], exc_info=err)
            err = RuntimeError(f"generation failed: {type(err).__name__}")
        for job in jobs:
            job._fail(err)

    # --- model.generate -------------------------------------------------------------------------------
    def _generation_kwargs(self, do_sample: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "pad_token_id": self.processor.pad_token_id,
            "eos_token_id": sorted(self.eos) or None,
        }
        if self.begin_suppress:
            kwargs["begin_suppress_tokens"] = list(self.begin_suppress)
        if do_sample:
            # Sampling is done by our per-row processor; keep the model's own warpers out of the way.
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        return kwargs

    def _run_generate(self, jobs: list[Job]) -> None:
        """Generate every choice of `jobs` in one batched `generate` call."""
        now = time.monotonic()
        rows = [row for job in jobs for row in self._start_rows(job, now)]
        batch = self._batch_of(row.job for row in rows)
        width = batch["input_ids"].shape[1]
        temps = [float(r.job.params.temperature) for r in rows]
        do_sample = any(t > 0 for t in temps)
        kwargs = self._generation_kwargs(do_sample)
        if do_sample:
            kwargs["logits_processor"] = LogitsProcessorList(
                [RowSampling(temps, [float(r.job.params.top_p) for r in rows])]
            )
        seed = jobs[0].params.seed if len(jobs) == 1 else None
        with self.model_lock:
            if seed is not None:
                torch.manual_seed(seed)
            self.batch_sizes.append(len(rows))
            self.model.generate(
                **batch,
                max_new_tokens=max(r.max_new_tokens for r in rows),
                do_sample=do_sample,
                num_beams=1,
                stopping_criteria=StoppingCriteriaList([RowTracker(rows, width)]),
                **kwargs,
            )
        for row in rows:  # only reached when generate stopped on its own limit
            row.finish("length")

    def _run_beams(self, job: Job) -> None:
        params = job.params
        job.started = time.monotonic()
        limit = self.max_new_tokens(job.prompt, params)
        batch = self._batch_of([job])
        kwargs = self._generation_kwargs(params.temperature > 0)
        if params.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [RowSampling([params.temperature] * params.num_beams, [params.top_p] * params.num_beams)]
            )
        with self.model_lock:
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
            row = self._row(job, i, limit)
            for token in seq:
                row.push(token)
                if row.done:
                    break
            row.finish("length")

    # --- the running batch ----------------------------------------------------------------------------
    def new_running_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.begin_suppress)

    def _run_continuous(self, jobs: list[Job]) -> None:
        """Generate `jobs` in a running batch of their own (direct calls): the same decode loop as the
        continuous scheduler's, with no newcomers."""
        running = self.new_running_batch()
        self.join_running(running, jobs)
        while len(running):
            self.step_running(running)

    def join_running(self, running: RunningBatch, jobs: list[Job]) -> list[Job]:
        """Prefill `jobs` and add their rows to `running`; returns the jobs that already left (failed, or
        finished on their first token). A failed prefill of several jobs is retried job by job, so that
        one bad request fails alone; the running rows go on either way."""
        now = time.monotonic()
        try:
            rows_per_prompt = [self._start_rows(job, now) for job in jobs]
            batch = self._batch_of(jobs)
            with self.model_lock:
                running.join(batch, rows_per_prompt)
            self.batch_sizes.append(len(running))
        except Exception as err:  # noqa: BLE001
            joined = {id(row.job) for row in running.rows}
            retry = [job for job in jobs if id(job) not in joined and not job.done]
            if len(jobs) == 1 or len(retry) < len(jobs):  # alone, or failed after joining: no retry
                self.fail_jobs(jobs, err)
            else:
                left = [job for one in retry for job in self.join_running(running, [one])]
                return left + running.drop_finished()
        left = running.drop_finished()
        return left + [job for job in jobs if job.done and job not in left]

    def step_running(self, running: RunningBatch) -> list[Job]:
        """One decode step of `running`; returns the jobs whose rows all left the batch."""
        try:
            with self.model_lock:
                running.step()
        except Exception as err:  # noqa: BLE001  (a failed step fails its rows, never the worker)
            jobs = running.clear()
            self.fail_jobs(jobs, err)
            return jobs
        return running.drop_finished()

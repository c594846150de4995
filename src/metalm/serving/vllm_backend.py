"""The vLLM engine: metalm builds each request's decoder input embeddings, vLLM decodes from them.

The split is the one ``MetaLMForCausalLM.generate`` has inside: the prompt in the model's trained layout
(`metalm.serving.prompts.PromptBuilder`), its encoders and connectors run by ``model.embed_inputs`` here;
the decoder's prefill and decode steps, with their paged KV cache and continuous batching, in vLLM. The
decoder is exported once as a plain Hugging Face folder (`metalm.serving.vllm_export`) that a vLLM server
(`metalm.serving.vllm_process`, its own environment) loads with ``--enable-prompt-embeds``; each request is
a streamed ``/v1/completions`` call with ``prompt_embeds`` (a base64 ``torch.save`` of the [positions,
hidden] tensor) and ``return_token_ids``, so metalm reads token ids, not vLLM's text.

Everything after the tokens is metalm's, as with its own engine: a `ChoiceRow` per choice decodes them with
metalm's tokenizer, applies stop strings, the token budget, the deadline and cancellation, and streams the
text. A row that ends (stop string, cancellation, deadline) before vLLM does closes the stream once all
rows of its job have ended, and vLLM aborts the request. An answer never starts with a WordPiece
continuation piece, as in metalm's engine (a vLLM logits processor, ``vllm_side/metalm_vllm_plugin.py``).

What vLLM's prompt-embedding path cannot take: beam search (``num_beams > 1`` is refused).
"""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
import time
from typing import Any

import httpx
import torch

from metalm.data.processor import InputError, MetaLMProcessor
from metalm.serving.generation import ChoiceRow, JobRunner
from metalm.serving.jobs import Job
from metalm.serving.scheduler import Scheduler
from metalm.serving.vllm_export import export_decoder
from metalm.serving.vllm_process import VLLMProcess, VLLMSettings

__all__ = ["VLLMRunner", "VLLMScheduler", "VLLMSettings"]

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DEFAULT_MAX_MODEL_LEN = 4096  # a long-context decoder's full length would not fit a small CPU KV cache


class VLLMRunner(JobRunner):
    """Generates jobs through a vLLM server: embeddings here (under the model lock), decoding there.

    Args:
        model, processor, device: as for `JobRunner` (the encoders, connectors and embedding table run here).
        settings: how to reach vLLM (`VLLMSettings`); without a ``url`` a server is started on the exported
            decoder and stopped by :meth:`close`.
        max_batch_size: vLLM's ``max_num_seqs`` unless the settings name one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: MetaLMProcessor,
        device: torch.device,
        settings: VLLMSettings,
        *,
        max_batch_size: int = 16,
    ) -> None:
        super().__init__(model, processor, device, "dynamic")
        self.batching, self.batching_note = "vllm", None
        decoder = model.decoder
        self.dtype = next(decoder.parameters()).dtype
        model_len = model.config.context_length() or _DEFAULT_MAX_MODEL_LEN
        self.max_model_len = settings.max_model_len or min(model_len, _DEFAULT_MAX_MODEL_LEN)
        self.process: VLLMProcess | None = None
        self.url = settings.url.rstrip("/") if settings.url else None
        self.served_name = None
        if self.url is None:
            folder = export_decoder(decoder, processor, settings.cache_dir)
            self.process = VLLMProcess(
                folder, settings, dtype=settings.dtype or _DTYPES[self.dtype],
                max_model_len=self.max_model_len, max_num_seqs=settings.max_num_seqs or max_batch_size,
            )  # fmt: skip
            self.url = self.process.url
            try:
                self.process.wait_ready()
            except BaseException:
                self.process.close()
                raise
        self.client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(30.0, read=600.0),
            limits=httpx.Limits(max_connections=None),
        )
        self.served_name = self.client.get("/v1/models").raise_for_status().json()["data"][0]["id"]

    @property
    def context_length(self) -> int | None:
        own = self.model.config.context_length()
        return min(own, self.max_model_len) if own is not None else self.max_model_len

    def close(self) -> None:
        """Stops the vLLM server this runner started (one it was pointed at keeps running)."""
        self.client.close()
        if self.process is not None:
            self.process.close()

    def run(self, jobs: list[Job]) -> None:
        """Generate `jobs` one after the other, each through one streamed vLLM request (the scheduler gives
        every job a thread of its own: vLLM batches them); results and failures go to the jobs."""
        for job in jobs:
            try:
                self._run_job(job)
            except Exception as err:  # noqa: BLE001  (a failed request must not kill the caller's thread)
                self.fail_jobs([job], err)

    def prompt_embeds(self, job: Job) -> torch.Tensor:
        """The decoder's input embeddings for `job`'s prompt, [positions, hidden] ( ``generate``'s own)."""
        batch = self._batch_of([job])
        with self.model_lock, torch.inference_mode():
            embeds = self.model.embed_inputs(
                batch["input_ids"], batch.get("encoder_inputs"), batch.get("encoder_slots")
            )
        return embeds[0].to("cpu", self.dtype).clone()

    def request_body(self, job: Job, limit: int) -> dict[str, Any]:
        buffer = io.BytesIO()
        torch.save(self.prompt_embeds(job), buffer)
        params = job.params
        body: dict[str, Any] = {
            "model": self.served_name, "prompt_embeds": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "max_tokens": limit, "n": 1 if self._greedy_choices(job) else params.n, "temperature": float(params.temperature),
            "top_p": float(params.top_p), "stream": True, "return_token_ids": True,
            "stop_token_ids": sorted(self.eos),
        }  # fmt: skip
        if params.seed is not None:
            body["seed"] = params.seed
        if self.begin_suppress:
            body["vllm_xargs"] = {"metalm_first_token_ban": 1}
        return body

    @staticmethod
    def _greedy_choices(job: Job) -> bool:
        """Several greedy choices: vLLM refuses them (they are all the same answer); one is asked for and
        its tokens go to every row, as metalm's engine would decode them."""
        return job.params.n > 1 and job.params.temperature == 0

    def _run_job(self, job: Job) -> None:
        if job.params.num_beams > 1:
            raise InputError(
                "beam search is not available with the vLLM engine (vLLM has none for prompt embeddings)"
            )
        rows = self._start_rows(job, time.monotonic())
        body = self.request_body(job, rows[0].max_new_tokens)
        fan_out = self._greedy_choices(job)
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                refusal = InputError if response.status_code == 400 else RuntimeError
                raise refusal(
                    f"vLLM answered {response.status_code}: {response.read()[:500].decode(errors='replace')}"
                )
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise RuntimeError(f"vLLM failed the request: {chunk['error']}")
                for choice in chunk.get("choices", []):
                    for row in rows if fan_out else [rows[choice["index"]]]:
                        self._advance(row, choice)
                if all(row.done for row in rows):
                    break  # leaving the block closes the stream: vLLM aborts what it still decodes
        for row in rows:
            row.finish("length")  # no-op for finished rows

    @staticmethod
    def _advance(row: ChoiceRow, choice: dict[str, Any]) -> None:
        """One streamed chunk of a choice: its new tokens, then its end if vLLM ended it."""
        for token in choice.get("token_ids") or ():
            row.push(token)
        if choice.get("finish_reason") and not row.done:
            row.finish("length" if choice["finish_reason"] == "length" else "stop")


class VLLMScheduler(Scheduler):
    """Sends every submitted job to vLLM at once, each from a thread of its own: vLLM's scheduler batches
    them (continuously, with its paged KV cache). The queue, limits, cancellation and deadlines while
    waiting are the `Scheduler`'s; ``max_batch_size`` bounds a request's ``n`` only (vLLM's own
    ``max_num_seqs`` bounds its batch)."""

    def __init__(self, runner: VLLMRunner, *, max_batch_size: int, max_pending: int) -> None:
        super().__init__(runner, max_batch_size=max_batch_size, batch_wait=0.0, max_pending=max_pending)
        self._running: set[Job] = set()
        self._running_lock = threading.Lock()

    def _work(self) -> None:
        while not self._closing.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._usable(job):
                with self._running_lock:
                    self._running.add(job)
                threading.Thread(
                    target=self._run_one, args=(job,), daemon=True, name=f"metalm-vllm-{job.id}"
                ).start()

    def _run_one(self, job: Job) -> None:
        try:
            self._run_and_release([job])
        finally:
            with self._running_lock:
                self._running.discard(job)

    def close(self) -> None:
        """Stop taking jobs; queued ones fail, running ones are cancelled (their next token ends them)."""
        super().close()
        with self._running_lock:
            for job in self._running:
                job.cancel()

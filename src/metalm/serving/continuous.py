"""Continuous (iteration-level) batching: one running batch with one KV cache, changed between decode steps.

Newcomers are prefilled together as one left-padded batch (their encoders run once, there), their first
tokens chosen from the last position's logits only, and their cache rows joined to the running batch: every
layer's keys and values are left-padded with zeros to a common length and concatenated along the batch
axis, and the attention mask is padded with zeros to match, so padding is never attended to. Each row keeps
its own position ids (its last position + 1 each step), so a row's attention and positions are what they
are when it runs alone. Finished rows leave after the step that finished them (their cache rows are
dropped), and the leading columns that no remaining row uses are cut off, so the cache does not grow with
the batch's history.

Seeded jobs join like any other; each draws from its own `torch.Generator`, so a handful of seeded requests
cannot hold the batch for everyone else (they used to run alone, one after another).

This reproduces `generate`'s greedy decoding step for step (prefill logits of the last position, begin-
suppressed continuation pieces, argmax), which the tests check against the batched `generate` path and
against one-by-one generation.

transformers' own `generation.continuous_batching` (`ContinuousBatchingManager`) does not fit: its requests
are token-id lists (`add_request(input_ids)`), with no way to hand it MetaLM's encoder features as
`inputs_embeds`, and it switches the model to paged attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from metalm.model.modeling_metalm import decoder_cache_kwarg

__all__ = ["RowSampling", "RunningBatch", "continuous_unsupported"]

# Generation-config settings whose logits processors the running batch does not apply.
_UNHANDLED_GENERATION_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
}


class RowSampling(LogitsProcessor):
    """Per-row temperature and nucleus (top-p) filtering; temperature 0 keeps only the argmax (greedy)."""

    def __init__(self, temperatures: list[float], top_ps: list[float]) -> None:
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)

    def __call__(self, input_ids: Any, scores: torch.FloatTensor) -> torch.FloatTensor:
        temps = self.temperatures.to(scores.device)
        top_ps = self.top_ps.to(scores.device)
        greedy = temps <= 0
        scores = scores.float() / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
        if bool((top_ps < 1).any()):
            sorted_scores, order = scores.sort(dim=-1)
            remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_ps)[:, None]
            remove[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        if bool(greedy.any()):
            onehot = torch.full_like(scores, float("-inf"))
            onehot.scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
            scores = torch.where(greedy[:, None], onehot, scores)
        return scores


class Row(Protocol):
    """What the running batch needs of a row (`metalm.serving.generation.ChoiceRow`)."""

    job: Any
    done: bool

    def push(self, token: int) -> None: ...


def continuous_unsupported(model: torch.nn.Module) -> str | None:
    """Why `model` cannot run in a `RunningBatch` (None: it can). Joining rows needs a cache made only of
    plain `DynamicLayer`s (keys/values [batch, heads, positions, dim]); sliding-window, chunked, linear or
    shared-KV layers keep per-layer offsets that left-padding would break."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(model, "embed_inputs"):
        return "not a MetaLM model"
    supports_dynamic = getattr(decoder, "_supports_default_dynamic_cache", lambda: True)
    if not supports_dynamic():
        return f"{type(decoder).__name__} does not use transformers' DynamicCache"
    try:
        layers = DynamicCache(config=decoder.config).layers
    except Exception as err:  # noqa: BLE001  (any failure means: keep the generate path)
        return f"its cache cannot be built from the config ({type(err).__name__}: {err})"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd or not layers:
        return f"its cache has {', '.join(odd) or 'no'} layers (sliding-window or hybrid attention)"
    config = getattr(model, "generation_config", None)
    active = [
        name
        for name, neutral in _UNHANDLED_GENERATION_SETTINGS.items()
        if getattr(config, name, neutral) not in (neutral, None)
    ]
    if active:
        return f"its generation config sets {', '.join(active)}"
    return None


def _job_generator(job: Any, device: torch.device) -> torch.Generator | None:
    """The random generator of a seeded job (made from its seed at its first draw; None: unseeded). Its
    rows draw from it in row order, so a seeded answer depends on its seed and logits alone: not on how
    many other rows are sampled in the same step (the logits themselves may differ in the last bits with
    the batch's shape)."""
    seed = job.params.seed
    if seed is None:
        return None
    generator = getattr(job, "generator", None)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed % 2**64)  # the API takes any int64; the generator wants it unsigned
        job.generator = generator
    return generator


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class RunningBatch:
    """The rows being decoded together, with their KV cache (see the module docstring).

    Args:
        model: a `MetaLMForCausalLM` (checked with `continuous_unsupported`).
        begin_suppress: token ids never chosen as a row's first token (WordPiece continuation pieces).
    """

    def __init__(self, model: torch.nn.Module, begin_suppress: Sequence[int] = ()) -> None:
        self.model = model
        self.begin_suppress = list(begin_suppress)
        self._cache_kwarg = decoder_cache_kwarg(model.decoder) or "past_key_values"
        self.clear()

    def clear(self) -> list[Any]:
        """Empty the batch; returns the jobs whose rows were in it."""
        jobs = list(dict.fromkeys(row.job for row in getattr(self, "rows", [])))
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached positions + 1 after a step], 0 = padding
        self.positions: torch.Tensor | None = None  # [rows]: position id of each row's last token
        self.tokens: torch.Tensor | None = None  # [rows]: each row's last chosen token, fed next step
        return jobs

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float()  # the last position only: the head never runs on the prompt

    def _choose(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        temps = [float(row.job.params.temperature) for row in rows]
        if not any(t > 0 for t in temps):
            return logits.argmax(-1)
        scores = RowSampling(temps, [float(row.job.params.top_p) for row in rows])(None, logits)
        probs = scores.softmax(-1)
        tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        for i, row in enumerate(rows):  # a seeded job draws from its own generator, whatever else runs
            generator = _job_generator(row.job, probs.device)
            if generator is not None:
                tokens[i] = torch.multinomial(probs[i], num_samples=1, generator=generator)[0]
        return tokens

    @torch.inference_mode()
    def join(self, batch: dict[str, Any], rows_per_prompt: Sequence[Sequence[Row]]) -> None:
        """Prefill the prompts of `batch` (a left-padded collate, one prompt per entry of `rows_per_prompt`),
        choose each new row's first token and add the rows to the running batch. A prompt with several rows
        (choices) is prefilled once and its cache rows repeated."""
        cache = DynamicCache(config=self.model.decoder.config)
        embeds = self.model.embed_inputs(
            batch["input_ids"], batch.get("encoder_inputs"), batch.get("encoder_slots")
        )
        logits = self._forward(
            cache,
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        if self.begin_suppress:
            logits[:, self.begin_suppress] = float("-inf")
        source = [i for i, rows in enumerate(rows_per_prompt) for _ in rows]
        new_rows = [row for rows in rows_per_prompt for row in rows]
        if source != list(range(len(rows_per_prompt))):
            index = torch.tensor(source, device=logits.device)
            cache.batch_select_indices(index)
            logits = logits[index]
        else:
            index = slice(None)
        tokens = self._choose(logits, new_rows)
        self._merge(cache, batch["attention_mask"][index], batch["position_ids"][index, -1], tokens)
        self.rows += new_rows
        for row, token in zip(new_rows, tokens.tolist()):
            row.push(token)

    def _merge(
        self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor
    ) -> None:
        mask = mask.long()
        if not self.rows:
            self.cache, self.mask, self.positions, self.tokens = cache, mask, positions, tokens
            return
        assert self.cache is not None and self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.tokens = torch.cat([self.tokens, tokens])

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row: feed each row's last token, choose and push the next."""
        if not self.rows:
            return
        assert self.cache is not None and self.mask is not None and self.positions is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.positions = self.positions + 1
        logits = self._forward(
            self.cache,
            input_ids=self.tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
        )
        self.tokens = self._choose(logits, self.rows)
        for row, token in zip(self.rows, self.tokens.tolist()):
            row.push(token)

    @torch.inference_mode()
    def drop_finished(self) -> list[Any]:
        """Remove finished rows (and rows of failed jobs) with their cache rows; returns the jobs that no
        longer have a row here."""
        keep = [i for i, row in enumerate(self.rows) if not row.done and not row.job.done]
        if len(keep) == len(self.rows):
            return []
        before = dict.fromkeys(row.job for row in self.rows)
        if not keep:
            self.clear()
            return list(before)
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask[index]
        first = int(mask.any(0).long().argmax())  # leading columns that only padding uses are cut
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions[index]
        self.tokens = self.tokens[index]
        remaining = {id(row.job) for row in self.rows}
        return [job for job in before if id(job) not in remaining]

"""The model calls evaluation makes: one right-padded forward that scores the labelled tokens of a batch
of samples (:func:`score_samples`, for ranked options and the lm-eval adapter) and greedy generation from
left-padded prompts (:func:`generate_samples`); and the decoder's position limit."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from metalm.data.processor import InputError, MetaLMProcessor, continuation_pieces
from metalm.data.segments import Sample, sample_length, to_device

__all__ = ["check_length", "decoder_context_length", "generate_samples", "score_samples"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoder_context_length(model) -> int | None:
    """The decoder's position limit (``max_position_embeddings`` / ``n_positions``), if it states one."""
    return model.config.context_length()


def check_length(model, sample: Sample, where: str) -> None:
    """Refuse a prompt longer than the decoder's position limit (`where` says whose)."""
    limit = decoder_context_length(model)
    if limit is not None:
        n = sample_length(sample, model.config)
        if n > limit:
            raise InputError(
                f"{where}: the prompt takes {n} decoder positions, more than the decoder's {limit}; "
                "use fewer shots or shorter inputs (a task's truncate_words)"
            )


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.decoder.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def score_samples(
    model, processor: MetaLMProcessor, samples: Sequence[Sample]
) -> list[tuple[float, int, bool]]:
    """One right-padded forward over ``samples``; per sample ``(sum log p, n scored tokens, greedy)``.

    The scored tokens are those with labels (``Target`` parts / ``TextSegment(loss=True)``); label at
    position p is predicted by the logits at p - 1. Only the logit rows needed are computed when the
    decoder supports ``logits_to_keep`` (large vocabularies)."""
    batch = to_device(processor.collate(list(samples), padding_side="right"), _device(model))
    labels = batch.pop("labels")
    target = labels[:, 1:] != -100
    rows, cols = target.nonzero(as_tuple=True)  # cols = predicting position p - 1
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model) and len(cols):
        keep = torch.unique(cols)
        kwargs["logits_to_keep"] = keep
        index = torch.full((labels.shape[1],), -1, dtype=torch.long, device=labels.device)
        index[keep] = torch.arange(len(keep), device=labels.device)
        pos = index[cols]
    else:
        pos = cols
    logits = model(**batch, **kwargs).logits
    picked = logits[rows, pos].float().log_softmax(-1)
    gold = labels[:, 1:][rows, cols]
    token_lp = picked.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    greedy_tok = picked.argmax(-1) == gold
    n = len(samples)
    sums = torch.zeros(n, dtype=torch.float64, device=token_lp.device).index_add_(0, rows, token_lp.double())
    counts = torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    misses = torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, (~greedy_tok).long())
    return [
        (float(s), int(c), bool(m == 0)) for s, c, m in zip(sums.tolist(), counts.tolist(), misses.tolist())
    ]


def _cut(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
    return text


@torch.inference_mode()
def generate_samples(
    model,
    processor: MetaLMProcessor,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    strip: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded, cut at the first stop string and (``strip``)
    stripped. Generation ends at the decoder's EOS token (the default demonstration separator)."""
    batch = to_device(processor.collate(list(samples), padding_side="left"), _device(model))
    batch.pop("labels")
    kwargs = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    pieces = continuation_pieces(processor.tokenizer)
    if pieces:  # every generation here starts a new word (after encoded slots, a prompt or a cue)
        kwargs.setdefault("begin_suppress_tokens", pieces)
    if processor.eos_token_id is not None:
        kwargs.setdefault("eos_token_id", processor.eos_token_id)
    kwargs.setdefault("pad_token_id", processor.pad_token_id)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    texts = []
    for row in new.tolist():
        if processor.eos_token_id is not None and processor.eos_token_id in row:
            row = row[: row.index(processor.eos_token_id)]
        text = _cut(processor.decode(row), stop)
        texts.append(text.strip() if strip else text)
    return texts

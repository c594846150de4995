"""The model calls evaluation makes: one right-padded forward that scores the labelled tokens of a batch
of samples (:func:`score_samples`, for the lm-eval adapter and decoders without a KV cache), the options
of ranked prompts read from each prompt's KV cache (:func:`score_continuations`), and greedy generation from
left-padded prompts (:func:`generate_samples`); and the decoder's position limit."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from metalm.data.processor import InputError, MetaLMProcessor, continuation_pieces
from metalm.data.segments import Sample, TextSegment, sample_length, to_device
from metalm.model.modeling_metalm import decoder_cache_kwarg

__all__ = [
    "check_length",
    "decoder_context_length",
    "generate_samples",
    "score_continuations",
    "score_samples",
    "shares_prompts",
]


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


def _cache_kwarg(model) -> str | None:
    """The keyword under which a MetaLM's decoder takes a KV cache, or None when it takes none or does not
    build transformers' DynamicCache."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(model, "embed_inputs"):
        return None
    if not getattr(decoder, "_supports_default_dynamic_cache", lambda: True)():
        return None
    return decoder_cache_kwarg(decoder)


def shares_prompts(model) -> bool:
    """Whether :func:`score_continuations` can run the model (its decoder keeps a DynamicCache)."""
    return _cache_kwarg(model) is not None


@torch.inference_mode()
def score_continuations(
    model,
    processor: MetaLMProcessor,
    prompts: Sequence[Sample],
    continuations: Sequence[Sequence[Sequence[int]]],
) -> list[list[tuple[float, int, bool]]]:
    """Per prompt, per continuation (decoder token ids, e.g. the options of a ranked task): ``(sum log p,
    n tokens, greedy)``, as :func:`score_samples` gives for the prompt followed by the continuation, within
    float rounding. Each prompt is run once (left-padded, its KV cache kept), and all its continuations
    read that cache, so a prompt with five options costs one prompt and five short tails, not five prompts."""
    from transformers import DynamicCache

    if any(not ids for conts in continuations for ids in conts):
        raise ValueError("a continuation has no tokens")
    cache_kwarg = _cache_kwarg(model)
    if cache_kwarg is None:  # no KV cache to share: each prompt + continuation as a whole sequence
        scored = iter(score_samples(model, processor, [[*p, TextSegment(list(ids), loss=True)] for p, conts in zip(prompts, continuations) for ids in conts]))  # fmt: skip
        return [[next(scored) for _ in conts] for conts in continuations]
    device = _device(model)
    batch = to_device(processor.collate(list(prompts), padding_side="left"), device)
    cache = DynamicCache(config=model.decoder.config)
    embeds = model.embed_inputs(batch["input_ids"], batch.get("encoder_inputs"), batch.get("encoder_slots"))
    kwarg = {cache_kwarg: cache}
    mask, positions = batch["attention_mask"], batch["position_ids"]
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **kwarg,
    )
    source = torch.tensor([b for b, conts in enumerate(continuations) for _ in conts], device=device)
    flat = [list(ids) for conts in continuations for ids in conts]
    width = max(len(ids) for ids in flat)
    # Row r, column j: the log-probabilities predicting token j of continuation r.
    log_probs = out.logits[:, -1].float().log_softmax(-1)[source].unsqueeze(1)
    if width > 1:  # the tails: each continuation's tokens but its last, read after its prompt's cache
        cache.batch_select_indices(source)
        pad = processor.pad_token_id or 0
        feed = torch.tensor([ids[:-1] + [pad] * (width - len(ids)) for ids in flat], device=device)
        fed = torch.tensor([[1] * (len(ids) - 1) + [0] * (width - len(ids)) for ids in flat], device=device)
        tail = (
            model(
                input_ids=feed,
                attention_mask=torch.cat([mask[source], fed.to(mask.dtype)], dim=1),
                position_ids=positions[source, -1:] + 1 + torch.arange(width - 1, device=device),
                use_cache=True,
                **kwarg,
            )
            .logits.float()
            .log_softmax(-1)
        )
        log_probs = torch.cat([log_probs, tail], dim=1)
    results = []
    for r, ids in enumerate(flat):
        rows = log_probs[r, : len(ids)]
        gold = torch.tensor(ids, device=device)
        picked = rows.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
        results.append((float(picked.double().sum()), len(ids), bool((rows.argmax(-1) == gold).all())))
    grouped, at = [], 0
    for conts in continuations:
        grouped.append(results[at : at + len(conts)])
        at += len(conts)
    return grouped


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

"""Does the decoder read the encoder? Held-out language-model loss on the text right after a span, with the
span (a) encoded by the text encoder, (b) removed, (c) given to the decoder as plain text.

If the decoder uses what the encoder hands it, (a) is below (b); (c) is the ceiling a lossless hand-over
would reach. `gap_closed` = (b - a) / (b - c) is the share of the plain-text benefit the encoded span gives
(1.0: as good as reading the text itself; 0: as if the span were not there; < 0: the span confuses it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import EncodedSegment, Sample, TextSegment
from metalm.evaluation.runner import score_samples
from metalm.modalities.text import TEXT, span_limit

CONDITIONS = ("encoded", "removed", "plain")
MIN_GAP = 0.05  # nats per token: below this, plain text barely helps and no share of it is reported


def gap_closed(loss: dict[str, float]) -> float | None:
    """(removed - encoded) / (removed - plain); None where reading the span as text hardly helps, since no
    share of that benefit is then meaningful."""
    benefit = loss["removed"] - loss["plain"]
    return (loss["removed"] - loss["encoded"]) / benefit if benefit > MIN_GAP else None


def text_encoder_name(model) -> str:
    names = model.config.encoders_of_kind("text")
    if not names:
        raise ValueError("the model has no text encoder: there is no encoded span to read")
    return names[0]


def condition_samples(
    processor: MetaLMProcessor, encoder: str, span: list[int], continuation: list[int]
) -> dict[str, Sample]:
    """The three samples for one document: only the continuation carries labels."""
    head = [TextSegment([processor.bos_token_id], loss=False)] if processor.bos_token_id is not None else []
    encoded = EncodedSegment(
        encoder, input_ids=TEXT.to_encoder_ids(processor, encoder, span), target_ids=span, loss=False
    )
    rest = TextSegment(continuation, loss=True)
    return {
        "encoded": [*head, encoded, rest],
        "removed": [*head, rest],
        "plain": [*head, TextSegment(span, loss=False), rest],
    }


def reads_encoder_losses(
    model,
    processor: MetaLMProcessor,
    documents: Sequence[str],
    *,
    span_tokens: int = 32,
    continuation_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean per-token loss (nats) of each document's `continuation_tokens` after its first `span_tokens`,
    under the three conditions. Documents shorter than span + continuation are skipped (and counted)."""
    encoder = text_encoder_name(model)
    span_tokens = min(span_tokens, span_limit(processor.config.encoder_spec(encoder)))
    per_doc: list[dict[str, Sample]] = []
    skipped = 0
    for text in documents:
        ids = processor.tokenize(text)
        if len(ids) < span_tokens + continuation_tokens:
            skipped += 1
            continue
        span, rest = ids[:span_tokens], ids[span_tokens : span_tokens + continuation_tokens]
        per_doc.append(condition_samples(processor, encoder, span, rest))
    if not per_doc:
        raise ValueError(f"no document has {span_tokens + continuation_tokens} tokens")
    totals = dict.fromkeys(CONDITIONS, 0.0)
    tokens = dict.fromkeys(CONDITIONS, 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(per_doc), batch_size), desc="reads-encoder", disable=not progress):
                chunk = per_doc[start : start + batch_size]
                for cond in CONDITIONS:
                    for logprob, n, _ in score_samples(model, processor, [d[cond] for d in chunk]):
                        totals[cond] -= logprob
                        tokens[cond] += n
    finally:
        model.train(was_training)
    loss = {c: totals[c] / tokens[c] for c in CONDITIONS}
    return {
        "documents": len(per_doc),
        "skipped": skipped,
        "span_tokens": span_tokens,
        "continuation_tokens": continuation_tokens,
        "loss": loss,
        "perplexity": {c: math.exp(v) for c, v in loss.items()},
        "gap_closed": gap_closed(loss),
    }

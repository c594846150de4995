"""Connector alignment: before training, fit a text encoder's linear connector so that each slot starts at
the decoder's own embedding of the word under it (`model.encoders[].align_tokens`).

A pretrained decoder reads its own word embeddings; a connector initialised at random hands it vectors it
has never seen, and the semi-causal objective must then teach it to read them, which takes far more steps
than a CPU run has (the Gemma-docked preset closed 0.24 of the "does the decoder read the encoder" gap in
500 steps). Each encoder token of the run's text documents is paired with the decoder token under its
first character (the text plugin's `alignment_part`), and the connector is set to the ridge
least-squares map from the encoder's outputs to those tokens' input embeddings (`fit_linear_connector`):
seconds of CPU, no decoder pass, and training then moves it like any other weight. It is an initialisation,
so a trained or resumed model never runs it again. Every process computes the same fit from the same
documents in the same order, so the replicas agree without a broadcast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from metalm.data.records import TextDocument
from metalm.data.segments import to_device
from metalm.modalities import get_modality
from metalm.model.connectors import fit_linear_connector
from metalm.training.config import ConfigError, TrainConfig

__all__ = ["align_connectors", "alignment_texts"]

logger = logging.getLogger("metalm.training")
MIN_WORDS = 8  # shorter lines (headlines, bylines) carry little context for the encoder
BATCH = 16


def alignment_texts(streams: Iterable[Any]) -> Iterator[str]:
    """The lines of at least MIN_WORDS words of the text documents of the training streams, in order."""
    for stream in streams:
        for record in getattr(stream, "records", None) or []:
            if isinstance(record, TextDocument):
                yield from (line for line in record.text.splitlines() if len(line.split()) >= MIN_WORDS)


def align_connectors(
    model: Any, processor: Any, config: TrainConfig, streams: Iterable[Any]
) -> dict[str, float]:
    """Fit the connector of each encoder whose recipe sets `align_tokens` on that many tokens of the
    run's text documents; returns the fits' R^2 by encoder name."""
    wanted = {r.name: r.align_tokens for r in config.model.encoders or [] if r.align_tokens}
    if not wanted:
        return {}
    streams = list(streams)
    fits = {}
    for name, tokens in wanted.items():
        where = f"model.encoders ({name}).align_tokens"
        try:
            features, targets = _alignment_pairs(model, processor, name, alignment_texts(streams), tokens)
            if len(features) == 0:
                raise ValueError(
                    f"the run's training streams hold no text documents of {MIN_WORDS}+ words to align the "
                    "connector on; add a text stream or drop align_tokens"
                )
            fits[name] = fit_linear_connector(model.connectors[name], features, targets)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        logger.info(
            "connector %r aligned to the decoder's word embeddings on %d tokens (R^2 %.3f)",
            name,
            len(features),
            fits[name],
        )
    return fits


@torch.no_grad()
def _alignment_pairs(
    model: Any, processor: Any, name: str, texts: Iterable[str], tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs (before the connector) and the decoder embeddings they should become, `tokens`
    rows at most (whole lines)."""
    plugin = get_modality(model.config.encoder_spec(name)["kind"])
    embed = model.get_input_embeddings()
    features, targets, count, chunk = [], [], 0, []
    was_training = model.training
    model.eval()
    try:
        for text in texts:
            pair = plugin.alignment_part(processor, name, text)
            if pair is None:
                raise ValueError(f"encoder {name!r} does not read text: its connector cannot be aligned")
            chunk.append(pair)
            count += len(pair[1])
            if len(chunk) == BATCH or count >= tokens:
                _encode_chunk(model, processor, name, embed, chunk, features, targets)
                chunk = []
            if count >= tokens:
                break
        if chunk:
            _encode_chunk(model, processor, name, embed, chunk, features, targets)
    finally:
        model.train(was_training)
    if not features:
        return torch.empty(0), torch.empty(0)
    return torch.cat(features), torch.cat(targets)


def _encode_chunk(model, processor, name, embed, chunk, features, targets) -> None:
    batch = processor([[part] for part, _ in chunk], add_bos=False)
    payload = to_device(batch["encoder_inputs"][name], model.device)
    out, mask = model.encoders[name](payload)
    features.append(out[mask].float().cpu())  # each row's slots in order: one per paired encoder token
    ids = torch.tensor([i for _, row_ids in chunk for i in row_ids], device=model.device)
    targets.append(embed(ids).float().cpu())

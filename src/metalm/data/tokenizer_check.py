"""Refusing a tokenizer that cannot be the model's own, before it gives silent wrong answers.

A model folder without ``tokenizer.json`` still "loads": transformers falls back to a 5-token
``BertTokenizer`` built from ``tokenizer_config.json``, every word becomes ``[UNK]``, and generation, the
server and evaluation all run on and answer ``""`` or score 0.0. :func:`check_tokenizer` refuses such a
tokenizer with one line saying what is wrong: one that reads ordinary English as unknown tokens, or whose
size does not match the vocabulary the decoder was saved with (the recipe builds the decoder's
embeddings from ``len(tokenizer)``; a docked pretrained decoder may pad its table, never to double)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metalm.model.loading import ModelLoadError

__all__ = ["PROBE_TEXT", "check_tokenizer"]

PROBE_TEXT = "the quick brown fox jumps over the lazy dog"
_FIX = "copy the folder's tokenizer.json (and tokenizer_config.json) from where the model was saved"


def check_tokenizer(tokenizer: Any, vocab_size: int | None, folder: str | Path) -> None:
    """Raises `ModelLoadError` when `tokenizer` cannot be the one a model with `vocab_size` embeddings
    (None: unknown) was saved with."""
    size = len(tokenizer)
    if vocab_size is not None and size > vocab_size:
        raise ModelLoadError(
            f"{folder}: the tokenizer has {size:,} tokens but the model embeds only {vocab_size:,}; {_FIX}"
        )
    if vocab_size is not None and size < vocab_size // 2:
        raise ModelLoadError(
            f"{folder}: the tokenizer has {size:,} tokens but the model was saved with a vocabulary of "
            f"{vocab_size:,} (is tokenizer.json missing?); {_FIX}"
        )
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and sum(i == unk for i in ids) * 2 > len(ids)):
        raise ModelLoadError(
            f"{folder}: the tokenizer reads ordinary English ({PROBE_TEXT!r}) as unknown tokens, so every "
            f"answer would be wrong; {_FIX}"
        )

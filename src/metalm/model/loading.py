"""Model folders: sha256 manifests, and one-line errors for broken folders before anything is loaded.

A saved model folder (``final/`` of a run, a checkpoint's ``model/``) is ``config.json``, safetensors
weights and processor files. ``manifest.json``, when present (the trainer writes one into ``final/`` and
into every checkpoint), holds the size and sha256 of every file. :func:`check_model_folder` runs before
``MetaLMForCausalLM.from_pretrained`` (so also under ``AutoModelForCausalLM``): it verifies the manifest
when there is one, parses ``config.json`` and checks every safetensors header against its file size,
and raises :class:`ModelLoadError` with one line saying what is wrong and what to do. Without it a
truncated file, a corrupt header or a bad config gives a 25-47 line traceback from deep inside
transformers, and a flipped byte in the weights loads and then fails every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_PATTERN",
    "MANIFEST",
    "ModelLoadError",
    "check_config",
    "check_model_folder",
    "fsync_dir",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

MANIFEST = "manifest.json"
# A training run's checkpoint folders (``checkpoint-N/``, its model in ``model/``): written by
# metalm.training.checkpoint, recognised by serving when it names a model after its run.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_FIX = "re-save the model or copy it again"


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; ``str(err)`` is one line: what is wrong and what to do.

    A ValueError, so command-line handlers that print ValueErrors as one line already print it."""


# --------------------------------------------------------------------------------------------
# Manifests (the checkpoint format of metalm.training.checkpoint, shared by model folders)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; nothing more we can do there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_manifest(folder: str | os.PathLike[str], **fields: Any) -> None:
    """Write ``folder/manifest.json`` (``format`` 2, `fields`, and the bytes and sha256 of every other
    file), fsyncing every file, the manifest and every sub-folder, so that a manifest on disk implies
    the files it lists are on disk too."""
    folder = Path(folder)
    files = {}
    for path in _files_under(folder):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        _fsync_file(path)
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump({"format": 2, **fields, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for sub in sorted({p.parent for p in _files_under(folder)}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)


def _weight_files(folder: Path, files: dict[str, Any], model_dir: str) -> list[str] | str:
    """The weight files a manifest must list for the model in `model_dir` ("" = the folder itself):
    ``model.safetensors``, or a sharded model's index and every shard it names. A str is a problem."""
    prefix = f"{model_dir}/" if model_dir else ""
    index = prefix + WEIGHTS_INDEX
    if index not in files:
        return [prefix + WEIGHTS]
    try:
        shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{index} is unreadable ({err})"
    return [index, *(prefix + s for s in sorted(shards))]


def verify_manifest(
    folder: str | os.PathLike[str], required: Iterable[str] = (), model_dir: str = ""
) -> str | None:
    """None when ``folder/manifest.json`` lists every `required` file and the weights of the model in
    `model_dir`, and every file it lists has its recorded size and sha256; else the reason, one line.
    The weights are always required: a manifest that skips them would vouch for a model it never saw."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        return f"no {MANIFEST} (interrupted save?)"
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    weights = _weight_files(folder, files, model_dir)
    if isinstance(weights, str):
        return weights
    for rel in [*required, *weights]:
        if rel not in files:
            return f"{rel} is not in the manifest"
    for rel, meta in files.items():
        path = folder / rel
        expected = meta.get("bytes") if isinstance(meta, dict) else None
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {expected}"
        if sha256_file(path) != meta.get("sha256"):
            return f"{rel} does not match its sha256 in the manifest (corrupt)"
    return None


# --------------------------------------------------------------------------------------------
# Model folders


def check_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``folder/config.json`` as a dict, validated as a MetaLMConfig when it says ``model_type: metalm``;
    raises ModelLoadError naming the file and the problem."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ModelLoadError(f"{folder} is not a folder: pass the folder of a saved metalm model")
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: pass the folder of a saved metalm model")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path} is not UTF-8 text (corrupt): {_FIX}") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(
            f"{path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}): {_FIX}"
        ) from None
    except ValueError as err:  # e.g. an integer over Python's int-string conversion limit
        raise ModelLoadError(f"{path} is not valid JSON ({err}): {_FIX}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{path} has no 'model_type': it is not a saved model's config; {_FIX}")
    if config["model_type"] == "metalm":
        from metalm.model.configuration_metalm import MetaLMConfig

        _check_sizes(path, config)
        try:
            MetaLMConfig.from_dict(dict(config))
        except (ValueError, TypeError, KeyError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelLoadError(f"{path}: {detail}: fix the file, or re-save the model") from None
    return config


# Architecture sizes transformers multiplies and indexes with: a string here ("256") fails deep inside
# the model's constructor with a 44-line traceback.
_SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings",
)  # fmt: skip


def _check_sizes(path: Path, config: dict[str, Any]) -> None:
    sections = [("text_config", config.get("text_config"))]
    sections += [(f"encoders[{i}].config", e.get("config")) for i, e in enumerate(config.get("encoders") or [])
                 if isinstance(e, dict)]  # fmt: skip
    for where, section in sections:
        if not isinstance(section, dict):
            continue
        for key in _SIZE_FIELDS:
            value = section.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ModelLoadError(
                    f"{path}: {where}.{key} must be a positive integer, got {value!r}: fix the file, or "
                    "re-save the model"
                )


def _check_safetensors(path: Path) -> None:
    """Check the header of one safetensors file and that the file is exactly as long as it says.
    (Safetensors: 8-byte little-endian header length, a JSON header, then the tensor bytes.)"""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is truncated ({size} bytes, no header): {_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelLoadError(
                f"{path} is truncated or its header is corrupt (header of {n} bytes, file of {size}): {_FIX}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise ModelLoadError(f"{path} has a corrupt header (not a safetensors file?): {_FIX}") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ModelLoadError(f"{path} is truncated (expected {expected} bytes, found {size}): {_FIX}")
    if size > expected:
        raise ModelLoadError(f"{path} has {size - expected} bytes after its last tensor (corrupt): {_FIX}")


def check_model_folder(folder: str | os.PathLike[str]) -> None:
    """Raise ModelLoadError (one line) unless `folder` looks loadable: its manifest verifies (when it has
    one), config.json parses and validates, and every safetensors file is complete. A manifest also
    catches what the cheap checks cannot: a changed byte inside the tensors."""
    folder = Path(folder)
    check_config(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{folder} has no .safetensors weights: {_FIX}")
    for path in weights:  # first: their messages say more than "does not match the manifest"
        _check_safetensors(path)
    if (folder / MANIFEST).is_file():
        problem = verify_manifest(folder, required=["config.json"])
        if problem is not None:
            raise ModelLoadError(
                f"{folder}: {problem}: {_FIX} (if you changed the files on purpose, delete {MANIFEST})"
            )

"""A content-addressed cache of the frozen lower part of docked encoders.

Where an encoder's lower layers are frozen (`trainable_layers`, see `Modality.lower_modules`), they run in
eval mode without gradients, so their output for one payload row (an image, a text span, a clip) is a pure
function of that row's inputs and the frozen weights. `FeatureCache` keeps those outputs, per row:

- the key of a row is a hash of its inputs (`Modality.row_inputs`: pixel values, span token ids, a clip's
  real mel frames), under a **fingerprint** of the encoder: the frozen modules' weights and buffers, the
  split point, the encoder spec, the dtype and the preprocessor's settings. Changing any of them changes
  the fingerprint, so stale entries are never read (they stay on disk under the old fingerprint);
- entries live in memory (least recently used first out, within `memory_mb`) and, with a `directory`, on
  disk as one safetensors file each, `<directory>/<fingerprint>/<key[:2]>/<key>.safetensors`, written to a
  temporary file and renamed, so a crash never leaves a half-written entry. An unreadable entry is
  recomputed, rewritten and counted (`stats.corrupt`);
- a batch mixes hits and misses: the missing rows are computed in one call of the lower part.

The model's maths does not change: `DockedEncoder.forward` runs the same `encode_upper` on the states,
whether they were computed or read. `attach(model)` hands the cache to every encoder that has a frozen
lower part; the trainer does that with `run.feature_cache` (metalm.training), evaluation with
`cache_features` (`metalm eval`, `metalm quickstart`, the scripts' `cached_eval`): a k-shot prompt encodes
every demonstration's image and question, most of them training examples whose features training cached;
and serving with a cache in memory only (`metalm.serving.engine.Engine`'s ``feature_cache_mb``): a server
shows its demonstrations before every request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from metalm.model.encoders import DockedEncoder

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class CacheStats:
    """Distinct rows of each batch served from memory, from disk, computed (misses), and disk entries
    found unreadable (a row repeated within a batch is looked up once)."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt: int = 0

    @property
    def lookups(self) -> int:
        return self.memory_hits + self.disk_hits + self.misses

    @property
    def hit_rate(self) -> float:
        return (self.memory_hits + self.disk_hits) / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def default_cache_dir() -> Path:
    """`$METALM_CACHE/features` (default `~/.cache/metalm/features`)."""
    from metalm.model.packaged import metalm_cache_dir

    return metalm_cache_dir() / "features"


def cache_dir(where: bool | str | Path) -> Path | None:
    """Where a cache setting keeps its entries: ``True`` → `default_cache_dir()`, a path → that folder (``~``
    expanded), ``False`` → nowhere (in memory only). `run.feature_cache` and `cache_features` read it."""
    if where is True:
        return default_cache_dir()
    if where is False:
        return None
    return Path(where).expanduser()


def cache_features(
    model: nn.Module, processor: Any, where: bool | str | Path = True, *, memory_mb: float = 1024
) -> FeatureCache | None:
    """Serve `model`'s encoders' frozen parts from a cache: on disk in `where` (`cache_dir`; by default the
    folder training fills) or, with ``where=False``, in memory alone (`metalm serve`: a server keeps no
    request's features on disk). A loaded model's parameters all require gradients, so the config's freezing
    (`apply_freezing`) is applied first: it says which parts are frozen. A model that already has a cache
    keeps it (returned). None when no encoder has a frozen part (or the model has no encoders)."""
    if not getattr(model, "encoders", None) or not hasattr(model, "apply_freezing"):
        return None
    attached = next((e.feature_cache for e in model.encoders.values() if e.feature_cache is not None), None)
    if attached is not None:
        return attached
    model.apply_freezing()
    preprocessors = getattr(processor, "preprocessors", None)
    cache = FeatureCache(cache_dir(where), memory_mb=memory_mb, preprocessors=preprocessors)
    return cache if cache.attach(model) else None


def _update_with_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def row_key(inputs: State) -> str:
    """The hash of one row's inputs (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(inputs):
        _update_with_tensor(digest, name, inputs[name])
    return digest.hexdigest()


def describe_preprocessor(preprocessor: Any) -> Any:
    """The settings of an encoder's preprocessor that a fingerprint covers (JSON-able)."""
    if preprocessor is None:
        return None
    if hasattr(preprocessor, "to_dict"):  # ImagePreprocessor, WhisperFeatureExtractor
        return preprocessor.to_dict()
    return {  # a tokenizer: its class, source, vocabulary and special tokens
        "type": type(preprocessor).__name__,
        "name_or_path": getattr(preprocessor, "name_or_path", None),
        "vocab_size": len(preprocessor) if hasattr(preprocessor, "__len__") else None,
        "special": getattr(preprocessor, "special_tokens_map", None),
    }


def encoder_fingerprint(encoder: DockedEncoder, preprocessor: Any = None) -> str:
    """Hash of what a frozen lower part's output depends on besides its input: the modules' weights and
    buffers, which modules they are (the split point), the spec, the dtype, the preprocessor, and the
    layout its plugin stores the output in (`Modality.lower_state_format`)."""
    lower = encoder.lower_modules() or []
    digest = hashlib.blake2b(digest_size=16)
    described = {
        "spec": encoder.spec,
        "modules": [type(module).__name__ for module in lower],
        "dtype": str(encoder.dtype),
        "preprocessor": describe_preprocessor(preprocessor),
        "state_format": encoder.modality.lower_state_format,
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for i, module in enumerate(lower):
        for name, tensor in module.state_dict().items():
            _update_with_tensor(digest, f"{i}.{name}", tensor)
    return digest.hexdigest()


def _weights_version(lower: list[nn.Module]) -> tuple[tuple[int, int], ...]:
    """Where the frozen tensors live and how often they were written in place: any load, copy or move
    changes it, and the fingerprint is then recomputed."""
    return tuple(
        (tensor.data_ptr(), tensor._version)
        for module in lower
        for tensor in [*module.parameters(), *module.buffers()]
    )


class FeatureCache:
    """Per-row outputs of encoders' frozen lower parts, in memory and (with `directory`) on disk.

    `preprocessors` (encoder name → its tokenizer / image preprocessor / feature extractor) puts their
    settings in the fingerprints. `memory_mb`: the in-memory layer's budget (0: disk only)."""

    def __init__(
        self,
        directory: str | Path | None = None,
        memory_mb: float = 1024,
        preprocessors: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.memory_budget = int(memory_mb * 2**20)
        self.preprocessors = dict(preprocessors or {})
        self.stats = CacheStats()
        self._memory: OrderedDict[tuple[str, str], State] = OrderedDict()
        self._memory_bytes = 0
        self._fingerprints: dict[str, tuple[tuple[tuple[int, int], ...], str]] = {}

    def attach(self, model: nn.Module) -> list[str]:
        """Serve every encoder of `model` that has a frozen lower part from this cache; their names."""
        names = []
        for name, encoder in model.encoders.items():
            if encoder.lower_modules() is not None:
                encoder.feature_cache = self
                names.append(name)
        return names

    @staticmethod
    def detach(model: nn.Module) -> None:
        for encoder in model.encoders.values():
            encoder.feature_cache = None

    def fingerprint(self, encoder: DockedEncoder) -> str:
        """The encoder's fingerprint, recomputed only when its frozen tensors were written or moved."""
        version = _weights_version(encoder.lower_modules() or [])
        known = self._fingerprints.get(encoder.name)
        if known is None or known[0] != version:
            known = (version, encoder_fingerprint(encoder, self.preprocessors.get(encoder.name)))
            self._fingerprints[encoder.name] = known
        return known[1]

    # --- the lookup ---------------------------------------------------------------------------------
    def lower_states(self, encoder: DockedEncoder, payload: State) -> list[State]:
        """`encoder.encode_lower(payload)`, row by row from the cache where it has them; the missing rows
        (each distinct one once) are computed in one call and stored."""
        fingerprint = self.fingerprint(encoder)
        on_host = {name: value.detach().cpu() for name, value in payload.items()}  # one copy, not per row
        keys = [row_key(row) for row in encoder.modality.row_inputs(encoder.spec, on_host)]
        found: dict[str, State] = {}
        for key in dict.fromkeys(keys):
            state = self._read(fingerprint, key)
            if state is not None:
                found[key] = state
        missing = [keys.index(key) for key in dict.fromkeys(keys) if key not in found]
        self.stats.misses += len(missing)
        if missing:
            index = torch.tensor(missing, device=next(iter(payload.values())).device)
            computed = encoder.encode_lower({name: value[index] for name, value in payload.items()})
            for i, state in zip(missing, computed):
                # Own copies: a row's slice must not keep the whole batch's tensor alive in memory.
                state = {name: value.clone() for name, value in state.items()}
                found[keys[i]] = state
                self._write(fingerprint, keys[i], state)
        device = next(iter(payload.values())).device
        return [{name: value.to(device) for name, value in found[key].items()} for key in keys]

    def _read(self, fingerprint: str, key: str) -> State | None:
        state = self._memory.get((fingerprint, key))
        if state is not None:
            self._memory.move_to_end((fingerprint, key))
            self.stats.memory_hits += 1
            return state
        path = self._path(fingerprint, key)
        if path is None or not path.is_file():
            return None
        try:
            state = load_file(path)
        except Exception as err:  # any unreadable entry (truncated, garbage) is recomputed
            logger.warning("feature cache: unreadable entry %s (%s); recomputing it", path, err)
            self.stats.corrupt += 1
            return None
        self.stats.disk_hits += 1
        self._remember(fingerprint, key, state)
        return state

    def _write(self, fingerprint: str, key: str, state: State) -> None:
        self._remember(fingerprint, key, state)
        path = self._path(fingerprint, key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file in the same folder, then an atomic rename: readers see a whole entry or none.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file({name: value.detach().cpu() for name, value in state.items()}, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _remember(self, fingerprint: str, key: str, state: State) -> None:
        if self.memory_budget <= 0:
            return
        size = sum(value.numel() * value.element_size() for value in state.values())
        if (fingerprint, key) in self._memory:
            return
        self._memory[(fingerprint, key)] = state
        self._memory_bytes += size
        while self._memory_bytes > self.memory_budget and self._memory:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= sum(value.numel() * value.element_size() for value in dropped.values())

    def _path(self, fingerprint: str, key: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / fingerprint / key[:2] / f"{key}.safetensors"

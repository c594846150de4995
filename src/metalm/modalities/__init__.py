"""Modality plugins: everything that depends on an encoder's kind, one module per kind.

An encoder spec names its `kind`; the :class:`Modality` registered under that kind owns what differs
between kinds: the spec's own fields and their defaults, the backbone and its forward pass, how a recipe
loads it and counts its slots, its preprocessor and how that is saved, the processor parts it reads and
the segments they become, how its payloads are checked and stacked for one encoder call, and the filler
payload of a label-free row. Adding a kind is one module (a `Modality` subclass that ends with
`register_modality(...)`) plus its line in `BUILTIN_MODALITIES`; code outside the package (a test, a user
project) registers its own with `register_modality` alone. See docs/design.md, "Modality plugins".

This module is only the registry and imports nothing of metalm, so the config, the collator and the model
can consult it without import cycles; the built-in plugins are imported on the first lookup.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metalm.modalities.base import Modality

__all__ = [
    "BUILTIN_MODALITIES",
    "encoder_kinds",
    "encoders_of_field",
    "media_fields",
    "get_modality",
    "modality_of_field",
    "modality_of_part",
    "register_modality",
    "unregister_modality",
]

# The kinds metalm ships, in the order they are listed.
BUILTIN_MODALITIES = ("metalm.modalities.text", "metalm.modalities.vision", "metalm.modalities.audio")

_REGISTRY: dict[str, Modality] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # set first: each module registers itself through register_modality
        for module in BUILTIN_MODALITIES:
            importlib.import_module(module)


def register_modality(modality: Modality, *, replace: bool = False) -> Modality:
    """Make `modality` the plugin of encoders of kind `modality.kind`. Registering a second plugin for a
    kind is an error unless `replace` (a test swapping one in)."""
    if not modality.kind:
        raise ValueError(f"{type(modality).__name__} has no `kind`")
    if modality.kind in _REGISTRY and not replace:
        raise ValueError(f"a modality for kind {modality.kind!r} is already registered")
    _REGISTRY[modality.kind] = modality
    return modality


def unregister_modality(kind: str) -> None:
    """Forget the plugin of `kind` (a test cleaning up after itself)."""
    _REGISTRY.pop(kind, None)


def encoder_kinds() -> tuple[str, ...]:
    """The encoder kinds a spec may name: one per registered plugin, the built-in ones first in their
    listed order (whichever module happened to be imported first), then the others as registered."""
    _load_builtins()

    def rank(kind: str) -> int:
        module = type(_REGISTRY[kind]).__module__
        return BUILTIN_MODALITIES.index(module) if module in BUILTIN_MODALITIES else len(BUILTIN_MODALITIES)

    return tuple(sorted(_REGISTRY, key=rank))


def get_modality(kind: str) -> Modality:
    """The plugin of encoder kind `kind`; ValueError naming the registered kinds when there is none."""
    _load_builtins()
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown encoder kind {kind!r}; one of {encoder_kinds()}") from None


def modality_of_part(part: Any) -> Modality | None:
    """The plugin that reads processor part `part` (an `Encode`, an `ImageInput`, ...), or None."""
    _load_builtins()
    for modality in _REGISTRY.values():
        if isinstance(part, modality.part_types):
            return modality
    return None


def modality_of_field(field: str) -> Modality | None:
    """The plugin whose inputs a record or request carries under `field` ("image", "audio"), or None."""
    _load_builtins()
    return next((m for m in _REGISTRY.values() if m.record_field == field), None)


def media_fields() -> tuple[str, ...]:
    """The record fields some plugin reads, in the order of `encoder_kinds` (images before speech)."""
    return tuple(f for kind in encoder_kinds() if (f := _REGISTRY[kind].record_field) is not None)


def encoders_of_field(config: Any, field: str) -> list[str]:
    """The encoders of `config` (a MetaLMConfig; none for a model without `encoders_of_kind`, a plain HF
    decoder) that read the inputs records carry under `field`."""
    modality = modality_of_field(field)
    if modality is None or not hasattr(config, "encoders_of_kind"):
        return []
    return list(config.encoders_of_kind(modality.kind))

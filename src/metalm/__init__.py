"""metalm: causal language models as general-purpose interfaces (MetaLM, Hao et al. 2022).

The names below are imported on first use, so that ``import metalm`` (and with it every ``metalm`` command,
``metalm --help`` included) does not pay for torch and transformers before it needs them. ``import metalm``
still registers MetaLM with ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoProcessor``: at once when
transformers is already imported, else right after transformers is (see :func:`_register_after_transformers`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AudioInput": "metalm.modalities.audio",
    "Encode": "metalm.modalities.text",
    "EncodedSegment": "metalm.data.segment_types",
    "EncoderRecipe": "metalm.recipe",
    "ImageInput": "metalm.modalities.vision",
    "InputError": "metalm.data.segment_types",
    "MetaLMConfig": "metalm.model.configuration_metalm",
    "MetaLMConfigError": "metalm.model.configuration_metalm",
    "MetaLMForCausalLM": "metalm.model.modeling_metalm",
    "MetaLMProcessor": "metalm.data.processor",
    "ModelRecipe": "metalm.recipe",
    "SlotCountError": "metalm.model.modeling_metalm",
    "Target": "metalm.data.processor",
    "TextSegment": "metalm.data.segment_types",
    "build_metalm": "metalm.recipe",
    "collate": "metalm.data.segments",
    "register_auto_classes": "metalm.model.modeling_metalm",
    "register_processor": "metalm.data.processor",
}

__all__ = sorted(k for k in _EXPORTS if not k.startswith("register_"))


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def register() -> None:
    """Register MetaLM with the transformers Auto classes (idempotent; imports torch and transformers)."""
    from metalm.data.processor import register_processor
    from metalm.model.modeling_metalm import register_auto_classes

    register_auto_classes()
    register_processor()  # AutoProcessor.from_pretrained(model_folder) -> MetaLMProcessor


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is first imported it wraps that module's loader so that
    MetaLM registers as soon as transformers has finished importing, then steps out of ``sys.meta_path``."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            run_module(module)
            _register_soon()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _register_soon() -> None:
    """Register, unless some metalm module is mid-import (it imported transformers): registering then could
    import a half-initialised metalm module. ``metalm.model.modeling_metalm`` and ``metalm.data.processor``
    register themselves when they finish importing, which covers that case."""
    for name, module in list(sys.modules.items()):
        if name.startswith("metalm.") and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return
    register()


def _register_after_transformers() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


_register_after_transformers()

"""HF config plumbing shared by the MetaLM config, the builder and the modality plugins.

A leaf module (it imports nothing of metalm), so that the config, the plugins it consults and the builder
can all use it without import cycles."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig


class MetaLMConfigError(ValueError):
    """A MetaLM configuration is invalid; the message names the encoder and the field."""


def config_from_dict(cfg: dict[str, Any], where: str = "config") -> PreTrainedConfig:
    """The HF config a serialised config dict describes (its `model_type` picks the class)."""
    cfg = dict(cfg)
    if "model_type" not in cfg:
        raise MetaLMConfigError(f"{where}: a config dict needs 'model_type', got keys {sorted(cfg)}")
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

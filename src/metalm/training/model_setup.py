"""The model a run trains: a new one from the recipe, the one in ``init_from``, or on resume the
checkpoint's; with the run's prompt layouts, LoRA adapters (``model.lora``) and the packing check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalm.model.hf_config import MetaLMConfigError
from metalm.training.config import ConfigError, TrainConfig, layouts_from_streams

__all__ = ["TrainingModel", "build_model_for_training", "check_packing", "describe_model"]

logger = logging.getLogger("metalm.training")


@dataclass
class TrainingModel:
    """The model to train, its processor, and the peft tuner while LoRA adapters are unmerged."""

    model: torch.nn.Module
    processor: Any
    lora: Any = None


def describe_model(model: Any) -> str:
    """One line on what a MetaLM is made of and what of it trains (for logs)."""

    def millions(params) -> str:
        return f"{sum(p.numel() for p in params) / 1e6:.1f}M"

    decoder = model.decoder
    encoders = ", ".join(
        f"{spec['name']} ({spec['kind']}, {spec['backbone']}, {millions(model.encoders[spec['name']].parameters())})"
        for spec in model.config.encoders
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = "trainable" if any(p.requires_grad for p in decoder.parameters()) else "frozen"
    return (
        f"decoder {decoder.config.model_type} ({millions(decoder.parameters())}, {frozen}); "
        f"encoders: {encoders or 'none'}; trainable {millions(trainable)} of {millions(model.parameters())}"
    )


def build_model_for_training(
    config: TrainConfig, resume: Path | None, *, fsdp: bool, deepspeed: bool
) -> TrainingModel:
    """The model and its processor, with the run's prompt layouts and any LoRA adapters."""
    built = _load_or_build(config, resume)
    model = built.model
    # The saved model carries the layouts it is trained on, so generate/chat/serve use them.
    model.config.prompt_layouts = layouts_from_streams(
        config.data.streams, getattr(model.config, "prompt_layouts", None)
    )
    if config.model.lora is not None:
        built.lora = _add_lora(model, config, built.lora, sharded=fsdp or deepspeed)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %.1fM parameters, %.1fM trainable", n_params / 1e6, n_train / 1e6)
    return built


def _load_or_build(config: TrainConfig, resume: Path | None) -> TrainingModel:
    """A new model from the recipe or `init_from`; on resume, the checkpoint's model (its saved config
    already holds any `init_from` overrides)."""
    from metalm.data.processor import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    attn = config.model.attn_implementation
    if resume is not None and config.model.lora is not None:
        # A LoRA run's checkpoints keep the adapters unmerged (see metalm.training.lora).
        from metalm.training.lora import load_lora_checkpoint

        model, lora = load_lora_checkpoint(resume / "model", config.model.lora, attn)
        return TrainingModel(
            model, MetaLMProcessor.from_pretrained(resume / "model", config=model.config), lora
        )
    if resume is not None:
        model = MetaLMForCausalLM.from_pretrained(resume / "model", attn_implementation=attn)
        model.apply_freezing()
        return TrainingModel(model, MetaLMProcessor.from_pretrained(resume / "model", config=model.config))
    if config.init_from is None:
        try:
            model, processor = config.model.to_recipe().build()
        except MetaLMConfigError as err:  # as init_from reports a new encoder it cannot dock
            raise ConfigError(f"{config.source or '<config>'}: model: {err}") from None
        return TrainingModel(model, processor)
    return _from_init(config)


def _from_init(config: TrainConfig) -> TrainingModel:
    """`init_from`: a saved MetaLM with the run's overrides and any encoders it lacks docked
    (metalm.training.init_from)."""
    from metalm.training.init_from import load_init_from

    return TrainingModel(*load_init_from(config))


def _add_lora(model: torch.nn.Module, config: TrainConfig, lora: Any, *, sharded: bool) -> Any:
    """Adapters on the decoder (a resumed LoRA model has its own already); returns the peft tuner."""
    if sharded:
        raise ConfigError("model.lora runs on one process or with DDP, not with FSDP or DeepSpeed")
    if lora is None:
        from metalm.training.lora import apply_lora

        lora = apply_lora(model, config.model.lora)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    logger.info("LoRA on the decoder: %.2fM adapter parameters (merged into final/)", n_lora / 1e6)
    return lora


def check_packing(config: TrainConfig, model: torch.nn.Module, *, fsdp: bool) -> None:
    """`data.pack` needs a decoder that keeps packed samples apart (measured, see `supports_packing`)
    and no filler rows (FSDP's are appended after the real rows, which packing would mix)."""
    if not config.data.pack:
        return
    where = f"{config.source or '<config>'}: data.pack"
    if fsdp:
        raise ConfigError(f"{where}: packing does not run with FSDP yet; use DDP or one process")
    if not model.supports_packing():
        decoder = model.config.text_config
        raise ConfigError(
            f"{where}: the decoder ({decoder.model_type}, attention {decoder._attn_implementation}) lets "
            "packed samples attend to each other; train it without packing"
        )

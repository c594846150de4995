"""LoRA adapters on a MetaLM's decoder, with peft (``model.lora`` in a training config).

:func:`apply_lora` injects adapters into ``model.decoder`` in place (``peft``'s ``LoraModel``: the decoder
stays the plain HF module the MetaLM forward calls, its adapted linear layers become LoRA layers) and
freezes the decoder's own weights; the encoders and connectors keep the freezing of the model config.
:func:`merge_lora` folds the adapters into the decoder's weights (``merge_and_unload``), after which the
model is an ordinary MetaLM again (``save_pretrained`` → ``AutoModelForCausalLM.from_pretrained``).
Checkpoints taken during training keep the adapters unmerged (keys ``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``); :func:`load_lora_checkpoint` rebuilds such a model exactly, for
resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metalm.training.config import ConfigError, LoraSettings

if TYPE_CHECKING:
    from peft.tuners.lora import LoraModel

    from metalm.model.modeling_metalm import MetaLMForCausalLM

__all__ = ["apply_lora", "load_lora_checkpoint", "lora_parameter_names", "merge_lora"]

ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install peft") from None
    return peft


def apply_lora(model: MetaLMForCausalLM, settings: LoraSettings) -> LoraModel:
    """Inject LoRA adapters into ``model.decoder`` (in place) and make them the decoder's only trainable
    parameters. Returns the peft tuner (keep it for :func:`merge_lora`)."""
    peft = _peft()
    from peft.tuners.lora import LoraModel

    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules) if settings.target_modules else None,
        bias="none",
    )
    # The decoder's own weights are frozen with LoRA; recording it in the config keeps apply_freezing()
    # (and a later init_from of the merged model) consistent with how it was trained.
    model.config.decoder_trainable = False
    model.apply_freezing()
    try:
        tuner = LoraModel(model.decoder, config, ADAPTER)
    except ValueError as err:  # e.g. target modules that the decoder does not have
        raise ConfigError(f"model.lora: {err}") from None
    for name, param in model.decoder.named_parameters():
        param.requires_grad_("lora_" in name)
    return tuner


def lora_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapter parameters in ``model`` (empty when none are injected)."""
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


def merge_lora(model: MetaLMForCausalLM, tuner: LoraModel) -> None:
    """Fold the adapters into the decoder's weights and remove the LoRA layers (``merge_and_unload``)."""
    model.decoder = tuner.merge_and_unload()
    # peft leaves its config on the module it adapted; the merged decoder is a plain model again.
    if hasattr(model.decoder, "peft_config"):
        del model.decoder.peft_config
    model.decoder.requires_grad_(False)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_lora_checkpoint(
    folder: str | Path, settings: LoraSettings, attn_implementation: str = "sdpa"
) -> tuple[MetaLMForCausalLM, LoraModel]:
    """A MetaLM with LoRA adapters from a checkpoint's ``model/`` folder written during a LoRA run (the
    adapters unmerged). Returns ``(model, tuner)``."""
    from transformers.utils import logging as hf_logging

    from metalm.model.modeling_metalm import MetaLMForCausalLM

    folder = Path(folder)
    state = _read_safetensors(folder)
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    if not adapters:
        raise ConfigError(
            f"{folder} holds no LoRA adapters: it was not saved by a run with model.lora; resume it without "
            "model.lora, or start the LoRA run in another run.output_dir"
        )
    # from_pretrained loads (and converts the names of) every weight except the adapted layers, whose
    # weights are stored under `<layer>.base_layer.weight`: it reports those as missing/unexpected, which
    # is expected here, so its load report is silenced; they are loaded right after.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = MetaLMForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".base_layer." in k}
    _, unexpected = model.load_state_dict(base, strict=False)
    tuner = apply_lora(model, settings)
    try:
        _, unexpected_lora = model.load_state_dict(adapters, strict=False)
    except RuntimeError as err:  # e.g. another LoRA rank: the adapter shapes differ
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ConfigError(
            f"{folder}: the checkpoint's adapters do not match model.lora {settings} (resume with the LoRA "
            f"settings it was trained with): {detail}"
        ) from None
    missing = sorted(set(lora_parameter_names(model)) - set(adapters))
    unexpected = [*unexpected, *unexpected_lora]
    if missing or unexpected:
        raise ConfigError(
            f"{folder}: the checkpoint's adapters do not match model.lora {settings}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]} (resume with the LoRA settings it was trained with)"
        )
    return model, tuner

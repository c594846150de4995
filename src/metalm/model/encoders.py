"""Bidirectional encoders behind one interface: payload tensors in, (features, slot mask) out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel

from metalm.data.images import EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, ImagePreprocessor


def _hf_config(spec: dict[str, Any]):
    cfg = dict(spec["config"])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class DockedEncoder(nn.Module):
    """One named encoder: the backbone (kept as `backbone` so its weights keep their own names).

    `forward(payload)` returns `(features [N, L, H], mask [N, L])`, `mask` marking the outputs that become
    decoder slots (for a text span: the span's own tokens, not the [CLS]/[SEP] around it).
    """

    def __init__(self, spec: dict[str, Any], backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.name, self.kind, self.backbone_type = spec["name"], spec["kind"], spec["backbone"]
        if backbone is None:
            backbone = build_backbone(spec)
        self.backbone = backbone
        _drop_unused_heads(self.backbone)
        self.hidden_size = encoder_hidden_size(self.backbone)

    def forward(self, payload: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "text":
            out = self.backbone(input_ids=payload["input_ids"], attention_mask=payload["attention_mask"])
            return out.last_hidden_state, payload["slot_mask"]
        pixel_values = payload["pixel_values"].to(self.dtype)
        if self.backbone_type == "efficientnet_lite0":
            feats = self.backbone(pixel_values)
        else:
            feats = self.backbone(pixel_values=pixel_values).last_hidden_state
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """A randomly initialised backbone from its spec (weights come from a checkpoint or the builder)."""
    if spec["backbone"] == "efficientnet_lite0":
        from metalm.model.vision import EfficientNetLite0Encoder

        return EfficientNetLite0Encoder()
    config = _hf_config(spec)
    model = AutoModel.from_config(config)
    # A CLIP/SigLIP full model holds a vision tower; dock only the tower.
    if hasattr(model, "vision_model") and spec["kind"] == "vision" and not hasattr(model, "embeddings"):
        model = model.vision_model
    return model


def encoder_hidden_size(backbone: nn.Module) -> int:
    if hasattr(backbone, "hidden_size") and isinstance(backbone.hidden_size, int):
        return backbone.hidden_size
    config = backbone.config
    for key in ("hidden_size", "d_model", "hidden_dim", "embed_dim"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the output width of encoder {type(backbone).__name__}")


def _drop_unused_heads(backbone: nn.Module) -> None:
    """Poolers are never used (MetaLM docks every output vector); drop them so no trainable parameter
    goes without a gradient (DDP would complain)."""
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    for name in ("post_layernorm", "head"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)


def layer_stack(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's layers in order: its own `layer_groups()` if it has one, else its largest ModuleList."""
    if hasattr(backbone, "layer_groups"):
        return list(backbone.layer_groups())
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the layer stack of {type(backbone).__name__} to freeze by layer")
    return list(max(lists, key=len))


def apply_trainable_layers(backbone: nn.Module, trainable_layers: int | None) -> None:
    """None: everything trainable; N: everything frozen except the last N layers (paper: N = 2)."""
    if trainable_layers is None:
        return
    backbone.requires_grad_(False)
    if trainable_layers > 0:
        for layer in layer_stack(backbone)[-trainable_layers:]:
            layer.requires_grad_(True)


def image_preprocessor_for(spec: dict[str, Any], folder: str | Path | None = None) -> ImagePreprocessor:
    """The input normalisation a vision backbone was trained with, at the spec's `image_size`.

    EfficientNet-Lite0: the TF Lite inception-style (x - 127) / 128. An HF tower (CLIP, SigLIP, ViT, ...):
    its own image processor's mean, std, resampling filter and centre crop, read from the tower's
    `preprocessor_config.json` when `folder` has one, else the defaults of the image processor class that
    transformers maps its model type to (CLIP's OpenAI mean/std, SigLIP's and ViT's 0.5/0.5); ImageNet
    statistics only when transformers knows no processor for it. The size stays the spec's: the tower's
    position embeddings are built for it."""
    size = int(spec["image_size"])
    if spec["backbone"] == "efficientnet_lite0":
        return ImagePreprocessor(size=size, mean=EFFICIENTNET_LITE0_MEAN, std=EFFICIENTNET_LITE0_STD)
    settings = _preprocessor_json(folder) or _processor_class_defaults(spec["config"]["model_type"])
    kwargs: dict[str, Any] = {"size": size}
    if settings.get("image_mean") is not None and settings.get("image_std") is not None:
        kwargs.update(mean=tuple(settings["image_mean"]), std=tuple(settings["image_std"]))
    if isinstance(settings.get("resample"), int):
        kwargs["resample"] = Image.Resampling(settings["resample"]).name.lower()
    # CLIP resizes the short side and crops the centre square; cropping first then resizing is the same.
    kwargs["center_crop"] = bool(settings.get("do_center_crop", False))
    return ImagePreprocessor(**kwargs)


def _preprocessor_json(folder: str | Path | None) -> dict[str, Any]:
    path = Path(folder) / "preprocessor_config.json" if folder is not None else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def _processor_class_defaults(model_type: str) -> dict[str, Any]:
    """mean/std/resample/centre-crop defaults of transformers' image processor for `model_type` (a tower's
    own type such as `clip_vision_model` falls back to its family, `clip`); {} when there is none."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    for key in (model_type, model_type.removesuffix("_vision_model")):
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(key)
        if names is None:
            continue
        # transformers 5 maps a type to {"pil": ..., "torchvision": ...}; earlier ones to (slow, fast).
        candidates = [names.get("pil"), *names.values()] if isinstance(names, dict) else list(names)
        for name in candidates:
            cls = getattr(transformers, name, None) if name else None
            if cls is not None:
                proc = cls()
                return {
                    k: getattr(proc, k, None)
                    for k in ("image_mean", "image_std", "resample", "do_center_crop")
                }
    return {}

"""Bidirectional encoders behind one interface: payload tensors in, (features, slot mask) out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metalm.modalities import get_modality


class DockedEncoder(nn.Module):
    """One named encoder: the backbone (kept as `backbone` so its weights keep their own names), run the
    way its kind's plugin (`metalm.modalities`) says.

    `forward(payload)` returns `(features [N, L, H], mask [N, L])`, `mask` marking the outputs that become
    decoder slots (for a text span: the span's own tokens, not the [CLS]/[SEP] around it).
    """

    def __init__(self, spec: dict[str, Any], backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.name, self.kind, self.backbone_type = spec["name"], spec["kind"], spec["backbone"]
        self.spec = spec
        self.modality = get_modality(spec["kind"])
        if backbone is None:
            backbone = self.modality.build_backbone(spec)
        self.backbone = backbone
        _drop_unused_heads(self.backbone)
        self.hidden_size = encoder_hidden_size(self.backbone)

        # A `metalm.model.feature_cache.FeatureCache` the frozen lower part's outputs are looked up in
        # (None: computed every time). Not a module: never saved with the model.
        self.feature_cache: Any = None
        self.train(self.training)

    def lower_modules(self) -> list[nn.Module] | None:
        """The frozen lower part of the backbone (see `Modality.lower_modules`); None when there is none,
        or when some of its parameters train after all (e.g. a model loaded without `apply_freezing`):
        then the backbone runs whole, as it would without the split."""
        lower = self.modality.lower_modules(self.backbone, self.spec)
        if lower is None or any(p.requires_grad for module in lower for p in module.parameters()):
            return None
        return lower

    def train(self, mode: bool = True) -> DockedEncoder:
        # The frozen lower part always runs in eval mode (BatchNorm running statistics, no dropout): its
        # outputs are then a pure function of the input, the same cached or not.
        super().train(mode)
        for module in self.lower_modules() or []:
            module.eval()
        return self

    def forward(self, payload: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lower_modules() is None:
            return self.modality.encode(self.backbone, self.spec, payload)
        if self.feature_cache is not None:
            states = self.feature_cache.lower_states(self, payload)
        else:
            states = self.encode_lower(payload)
        return self.modality.encode_upper(self.backbone, self.spec, states, payload)

    def encode_lower(self, payload: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The frozen lower part's per-row outputs, computed (eval mode, no gradients)."""
        lower = self.lower_modules() or []
        if any(module.training for module in lower):  # someone set the backbone's mode directly
            self.train(self.training)
        with torch.no_grad():
            return self.modality.encode_lower(self.backbone, self.spec, payload)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


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

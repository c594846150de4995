"""Vision encoders: an image read by EfficientNet-Lite0 (packaged) or an HF vision tower (CLIP, SigLIP,
ViT, ...), one slot per output vector (a fixed count, measured when the model is built).

The processor parts are `ImageInput` and a bare PIL image; the preprocessor is an `ImagePreprocessor` with
the normalisation the backbone was trained with; a segment holds `pixel_values` [3, H, W], and the payload
stacks them.

`feature_layer` picks the layer whose outputs become slots (LLaVA's `vision_feature_layer`): None, the
backbone's last; else an index into its layer outputs, negative from the end (EfficientNet-Lite0: 0 the
stem, 1-16 its blocks, 17 the head; an HF tower: its `hidden_states`, 0 the embeddings), or a list of them,
whose outputs are concatenated vector by vector. The layers above the last one named are dropped from the
model, so they neither run nor train nor are saved.

`slot_grid` (None: every map position a slot) average-pools the feature map to a G x G grid of slots, so that
an image read at a larger `image_size` costs the decoder no more positions (an HF tower's class token, where
it has one, stays the first slot).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from metalm.data.images import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    ImageError,
    ImagePreprocessor,
    load_image,
)
from metalm.data.segment_types import EncodedSegment, InputError, SampleError
from metalm.modalities import register_modality
from metalm.modalities.base import Modality, Payload, Processor, source_name
from metalm.model.vision import PACKAGED_EFFICIENTNET, EfficientNetLite0Encoder, resolve_feature_layers

if TYPE_CHECKING:
    from metalm.recipe import EncoderRecipe

EFFICIENTNET = "efficientnet_lite0"


@dataclass
class ImageInput:
    """An image (path, bytes, data URL or PIL image) for a named vision encoder."""

    image: Any
    encoder: str | None = None
    # How errors name the image (a record's file, "data URL"); None: where it sits in the prompt.
    name: str | None = None


def probe_image(size: int = 64) -> Image.Image:
    """A fixed colourful image: RGB gradients with a dark square (content for an encoder, not noise)."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), 255 - np.tile(ramp, (size, 1))], -1
    )
    rgb[size // 4 : size // 2, size // 4 : size // 2] = (20, 40, 60)
    return Image.fromarray(rgb.astype(np.uint8))


def vision_tower(model: nn.Module) -> nn.Module:
    """A CLIP/SigLIP full model holds a vision tower next to its text tower: dock only the vision tower."""
    if hasattr(model, "vision_model") and not hasattr(model, "embeddings"):
        return model.vision_model
    return model


class VisionModality(Modality):
    kind = "vision"
    spec_defaults = {"image_size": 224, "feature_layer": None, "slot_grid": None}
    backbones = ("hf", EFFICIENTNET)
    part_types = (ImageInput, Image.Image)
    record_field = "image"
    packaged_sources = (PACKAGED_EFFICIENTNET,)
    lower_state_format = 2  # 2: each feature layer's map below the split, then the split's map

    def check_spec(self, spec: dict[str, Any]) -> None:
        size = spec["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"field 'image_size' must be an int > 0, got {size!r}")
        layer = spec["feature_layer"]
        named = layer if isinstance(layer, list) else [layer]
        if layer is not None and (not named or any(type(i) is not int for i in named)):
            raise ValueError(
                f"field 'feature_layer' must be null (the last layer), an int or a list of ints, got {layer!r}"
            )
        grid = spec["slot_grid"]
        if grid is not None and (type(grid) is not int or grid <= 0):
            raise ValueError(
                f"field 'slot_grid' must be null (every map position) or an int > 0, got {grid!r}"
            )

    # --- the model ---------------------------------------------------------------------------------
    def build_backbone(self, spec: dict[str, Any]) -> nn.Module:
        if spec["backbone"] == EFFICIENTNET:
            return EfficientNetLite0Encoder(spec["feature_layer"])
        return keep_layers_up_to(vision_tower(super().build_backbone(spec)), spec["feature_layer"])

    def encode(
        self, backbone: nn.Module, spec: dict[str, Any], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = payload["pixel_values"].to(next(backbone.parameters()).dtype)
        if spec["backbone"] == EFFICIENTNET:
            feats = backbone(pixel_values)
        elif spec["feature_layer"] is None:
            feats = backbone(pixel_values=pixel_values).last_hidden_state
        else:  # the hidden states named, raw (no final norm), as LLaVA reads them
            hidden = backbone(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            feats = torch.cat([hidden[i] for i in backbone.feature_layers], -1)
        feats = pool_slots(feats, spec["slot_grid"])
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    # --- the frozen lower part: EfficientNet splits between its layers, an HF tower only fully frozen --
    def lower_modules(self, backbone: nn.Module, spec: dict[str, Any]) -> list[nn.Module] | None:
        if spec["backbone"] != EFFICIENTNET:
            return super().lower_modules(backbone, spec)
        trainable = spec.get("trainable_layers")
        if trainable is None or trainable >= len(backbone.layers):
            return None
        return list(backbone.layers)[: len(backbone.layers) - trainable]

    def encode_lower(self, backbone: nn.Module, spec: dict[str, Any], payload: Payload) -> list[Payload]:
        if spec["backbone"] != EFFICIENTNET:
            return super().encode_lower(backbone, spec, payload)
        pixels = payload["pixel_values"].to(next(backbone.parameters()).dtype)
        split = len(self.lower_modules(backbone, spec))
        maps, taps = backbone.run_layers(pixels, 0, split)
        rows: list[Payload] = [
            {f"feature_layer_{j}": tap[i] for j, tap in enumerate(taps)} for i in range(len(maps))
        ]
        if split < len(backbone.layers):  # the upper part goes on from here
            for row, feature_map in zip(rows, maps):
                row["feature_map"] = feature_map
        return rows

    def encode_upper(
        self, backbone: nn.Module, spec: dict[str, Any], states: list[Payload], payload: Payload
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if spec["backbone"] != EFFICIENTNET:
            return super().encode_upper(backbone, spec, states, payload)
        split = len(self.lower_modules(backbone, spec))
        below = sum(index < split for index in backbone.feature_layers)
        taps = [torch.stack([state[f"feature_layer_{j}"] for state in states]) for j in range(below)]
        if split < len(backbone.layers):
            taps += backbone.run_layers(torch.stack([state["feature_map"] for state in states]), split)[1]
        feats = pool_slots(backbone.tokens(taps), spec["slot_grid"])
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    # --- building from a recipe ----------------------------------------------------------------------
    def load_backbone(self, recipe: EncoderRecipe) -> tuple[nn.Module, dict[str, Any], str | None]:
        layer = recipe.feature_layer
        slots = {"feature_layer": layer, "slot_grid": recipe.slot_grid}
        architecture: dict[str, Any] = {"backbone": EFFICIENTNET, **slots}
        if recipe.source == PACKAGED_EFFICIENTNET:
            return EfficientNetLite0Encoder.from_packaged(layer), architecture, None
        if recipe.source == "config" and (recipe.config or {}).get("model_type") == EFFICIENTNET:
            return EfficientNetLite0Encoder(layer), architecture, None
        backbone, _, folder = super().load_backbone(recipe)
        backbone = vision_tower(backbone)
        # The whole tower's config: a rebuild (`build_backbone`) drops the same layers again.
        architecture = {"backbone": "hf", "config": backbone.config.to_dict(), **slots}
        return keep_layers_up_to(backbone, layer), architecture, folder

    def complete_spec(
        self,
        recipe: EncoderRecipe,
        spec: dict[str, Any],
        backbone: nn.Module,
        folder: str | None,
        decoder_tokenizer: Any,
    ) -> ImagePreprocessor:
        """The slot count is measured on a blank image of the recipe's size."""
        spec["image_size"] = recipe.image_size
        with torch.no_grad():
            dummy = torch.zeros(1, 3, recipe.image_size, recipe.image_size)
            spec["num_slots"] = self.encode(backbone, spec, {"pixel_values": dummy})[0].shape[1]
        return image_preprocessor_for(spec, folder)

    def probe_part(self, spec: dict[str, Any]) -> ImageInput:
        return ImageInput(probe_image(), encoder=spec["name"])

    # --- the image preprocessor ----------------------------------------------------------------------
    def default_preprocessor(self, spec: dict[str, Any]) -> ImagePreprocessor:
        return image_preprocessor_for(spec)

    def save_preprocessor(
        self, name: str, preprocessor: ImagePreprocessor, directory: Path, meta: dict[str, Any]
    ) -> None:
        meta.setdefault("image_processors", {})[name] = preprocessor.to_dict()

    def load_preprocessor(
        self, spec: dict[str, Any], directory: Path, meta: dict[str, Any]
    ) -> ImagePreprocessor | None:
        saved = meta.get("image_processors", {}).get(spec["name"])
        return None if saved is None else ImagePreprocessor.from_dict(saved)

    def part(self, value: Any, encoder: str | None = None) -> ImageInput:
        return ImageInput(value, encoder=encoder)

    def record_part(self, value: Any, encoder: str | None, name: str | None = None) -> ImageInput:
        return ImageInput(value, encoder=encoder, name=name)

    def describe_part(self, part: Any, max_chars: int = 80) -> str:
        return f"<image:{source_name(part.image)}>" if isinstance(part, ImageInput) else "<image>"

    def segment(
        self, processor: Processor, part: Any, where: str, cache: ImageCache | None = None
    ) -> EncodedSegment:
        if not isinstance(part, ImageInput):
            part = ImageInput(part)
        name = processor.encoder_for(self.kind, part.encoder, where)
        preprocessor = processor.preprocessors[name]
        try:
            if cache is not None and isinstance(part.image, str | bytes):
                pixels = cache.get(part.image, preprocessor, name=part.name or where)
            else:
                pixels = preprocessor([load_image(part.image, name=part.name or where)])[0]
        except ImageError as err:
            raise InputError(str(err)) from err
        return EncodedSegment(name, pixel_values=pixels)

    def new_cache(self, max_bytes: int) -> ImageCache:
        return ImageCache(max_bytes)

    # --- collation -------------------------------------------------------------------------------------
    def check_segment(self, spec: dict[str, Any], seg: EncodedSegment, where: str) -> None:
        if not isinstance(seg.payload, torch.Tensor):
            raise SampleError(f"{where}: {spec['kind']} encoder {seg.encoder!r} needs pixel_values")

    def collate(self, spec: dict[str, Any], segments: list[EncodedSegment]) -> Payload:
        return {"pixel_values": torch.stack([seg.payload for seg in segments])}

    def filler(self, spec: dict[str, Any], preprocessor: ImagePreprocessor) -> EncodedSegment:
        size = preprocessor.size
        return EncodedSegment(spec["name"], pixel_values=torch.zeros(3, size, size), loss=False)


def pool_slots(feats: torch.Tensor, grid: int | None) -> torch.Tensor:
    """``[B, N, C]`` map tokens (row-major; an HF tower's class token first where N = 1 + h * w) average-pooled
    to ``grid * grid`` tokens (the class token kept first); unchanged for ``grid`` None."""
    if grid is None:
        return feats
    count = feats.shape[1]
    lead = 0 if math.isqrt(count) ** 2 == count else 1
    side = math.isqrt(count - lead)
    if side * side != count - lead:
        raise ValueError(
            f"field 'slot_grid': the backbone gives {count} vectors an image, not a square map (with or without "
            "a class token first); leave slot_grid out for this backbone"
        )
    if grid > side:
        raise ValueError(
            f"field 'slot_grid' is {grid}, but the backbone's map is {side}x{side} at this image_size: "
            f"set it to at most {side} or raise image_size"
        )
    batch, _, width = feats.shape
    maps = feats[:, lead:].transpose(1, 2).reshape(batch, width, side, side)
    pooled = nn.functional.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
    return torch.cat([feats[:, :lead], pooled], 1)


def keep_layers_up_to(tower: nn.Module, feature_layer: int | list[int] | None) -> nn.Module:
    """`tower` (in place) without the layers above those `feature_layer` names (indices into its
    `hidden_states`, which count the embeddings first), which it then lists as `feature_layers` (indices
    that stay valid in the shorter tower); unchanged when it is None. For towers with one stack of layers
    (CLIP, SigLIP, ViT: its largest ModuleList), whose `hidden_states` are that stack's outputs."""
    if feature_layer is None:
        return tower
    stack = max((m for m in tower.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    if stack is None:
        raise ValueError(
            f"cannot find the layer stack of {type(tower).__name__} to take 'feature_layer' from"
        )
    width = tower.config.hidden_size  # CLIP, SigLIP, ViT towers name their width so
    tower.feature_layers = resolve_feature_layers(feature_layer, len(stack) + 1)
    del stack[tower.feature_layers[-1] :]
    tower.hidden_size = width * len(tower.feature_layers)  # the width the connector reads (DockedEncoder)
    return tower


class ImageCache:
    """Decoded, resized images as uint8 [3, H, W] arrays keyed by (reference, size, resample, crop);
    normalisation is applied on the way out, giving exactly ``ImagePreprocessor.prepare``'s values.
    Caching stops (without evicting) once ``max_bytes`` are held."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._cache: dict[tuple, np.ndarray] = {}
        self._arrays: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, ref: str | bytes, pre: ImagePreprocessor, name: str | None = None) -> torch.Tensor:
        key = (ref, pre.size, pre.resample, pre.center_crop)
        u8 = self._cache.get(key)
        if u8 is None:
            # prepare() with mean 0 / std 1 gives the resized pixels / 255: exact uint8 after rounding.
            raw = dataclasses.replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
            u8 = np.rint(raw.prepare(load_image(ref, name=name)) * 255.0).astype(np.uint8)
            if self.bytes + u8.nbytes <= self.max_bytes:
                self._cache[key] = u8
                self.bytes += u8.nbytes
        # Same operations, in the same float32 order, as ImagePreprocessor.prepare (in place: a fresh array).
        arr = u8.astype(np.float32) / np.float32(255.0)
        mean, std = self._normalisation(pre)
        arr -= mean
        arr /= std
        return torch.from_numpy(arr)

    def _normalisation(self, pre: ImagePreprocessor) -> tuple[np.ndarray, np.ndarray]:
        """`pre`'s mean and std as float32 [3, 1, 1] arrays, made once (every image of a batch asks)."""
        key = (pre.mean, pre.std)
        found = self._arrays.get(key)
        if found is None:
            found = self._arrays[key] = tuple(np.asarray(v, dtype=np.float32)[:, None, None] for v in key)
        return found


def image_preprocessor_for(spec: dict[str, Any], folder: str | Path | None = None) -> ImagePreprocessor:
    """The input normalisation a vision backbone was trained with, at the spec's `image_size`.

    EfficientNet-Lite0: the TF Lite inception-style (x - 127) / 128. An HF tower (CLIP, SigLIP, ViT, ...):
    its own image processor's mean, std, resampling filter and centre crop, read from the tower's
    `preprocessor_config.json` when `folder` has one, else the defaults of the image processor class that
    transformers maps its model type to (CLIP's OpenAI mean/std, SigLIP's and ViT's 0.5/0.5); ImageNet
    statistics only when transformers knows no processor for it. The size stays the spec's: the tower's
    position embeddings are built for it."""
    size = int(spec["image_size"])
    if spec["backbone"] == EFFICIENTNET:
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


register_modality(VisionModality())

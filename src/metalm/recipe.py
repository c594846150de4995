"""Build a MetaLM from parts: a decoder (config, folder, hub id or a packaged decoder) and encoders (config,
folder, hub id or a packaged asset). `from_pretrained` on a saved MetaLM needs none of this: the saved
config holds every part's full architecture, and the weights are in its safetensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ConfigDict, StrictInt, StrictStr, with_config
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import to_device
from metalm.modalities import encoder_kinds, get_modality
from metalm.modalities.text import PROBE_TEXT
from metalm.modalities.vision import probe_image
from metalm.model.configuration_metalm import MetaLMConfig, MetaLMConfigError
from metalm.model.hf_config import config_from_dict
from metalm.model.modeling_metalm import MetaLMForCausalLM
from metalm.model.packaged import (
    PACKAGED_GEMMA,
    PACKAGED_MINILM,
    load_tokenizer,
    packaged_minilm_path,
    resolve_source,
)
from metalm.model.vision import PACKAGED_EFFICIENTNET

__all__ = [
    "PACKAGED_EFFICIENTNET",
    "PACKAGED_GEMMA",
    "PACKAGED_MINILM",
    "EncoderRecipe",
    "ModelRecipe",
    "build_metalm",
    "dock_encoders",
    "load_tokenizer",
    "match_connector_scale",
    "packaged_minilm_path",
    "probe_image",
]

logger = logging.getLogger(__name__)


# A training config's `model.encoders` entries are validated against these fields (metalm.training.config):
# unknown keys are errors and values are not coerced ('224' is not an int). A plain dataclass still, so
# building one in Python costs nothing and positional arguments keep working.
@with_config(ConfigDict(extra="forbid"))
@dataclass
class EncoderRecipe:
    """Where an encoder comes from and how it docks. `source`: `config` (random init from `config`),
    `packaged:minilm-l6`, `packaged:efficientnet-lite0`, or a local folder / hub id. A vision encoder's
    `image_size` must be the size its backbone was built for (an HF tower's position embeddings)."""

    name: StrictStr
    kind: StrictStr
    source: StrictStr = "config"
    config: dict[StrictStr, Any] | None = None
    tokenizer: StrictStr | None = None
    connector: StrictStr | dict[StrictStr, Any] = "linear"
    trainable_layers: StrictInt | None = None
    image_size: StrictInt = 224
    # A vision encoder: the layer (or layers, concatenated) whose outputs become slots (None: the last;
    # metalm.modalities.vision).
    feature_layer: StrictInt | list[StrictInt] | None = None
    # A vision encoder: average-pool its feature map to this many slots a side (None: one slot per position).
    slot_grid: StrictInt | None = None
    max_length: StrictInt | None = None
    # Before training, fit the (linear) connector by least squares on this many tokens of the run's text
    # documents, so that each slot starts at the decoder's embedding of the word under it (text encoders
    # on a pretrained decoder; metalm.training.connector_alignment). None: the scale-matched random init.
    align_tokens: StrictInt | None = None
    # Training: the weight of a CTC loss that trains this (audio) encoder's slots to say, as the decoder's
    # word embeddings, what each training clip says (its record's transcript;
    # `metalm.model.objectives.transcript_loss`).
    transcript_loss: float | None = None


@dataclass
class ModelRecipe:
    """A MetaLM to build: `decoder` is an HF config dict (with `model_type`), a folder / hub id, or a
    packaged decoder (`packaged:gemma3-270m`, the optional `gemma` extra); `tokenizer` names the decoder
    tokenizer (default: the decoder's own, packaged ones included)."""

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
        config = config_from_dict({**recipe.decoder, **special, "vocab_size": len(tok)}, "decoder")
        config._attn_implementation = recipe.attn_implementation
        return AutoModelForCausalLM.from_config(config, attn_implementation=recipe.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_source(recipe.decoder), attn_implementation=recipe.attn_implementation
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def _build_encoder(r: EncoderRecipe, decoder_tok: PreTrainedTokenizerBase) -> tuple[dict, nn.Module, Any]:
    """Returns (spec, backbone, preprocessor): how the backbone loads and what its spec holds beyond the
    common fields is its kind's business (`metalm.modalities`)."""
    try:
        modality = get_modality(r.kind)
    except ValueError as err:
        raise MetaLMConfigError(f"encoder {r.name!r}: {err}") from None
    owner = next(
        (kind for kind in encoder_kinds() if r.source in get_modality(kind).packaged_sources), r.kind
    )
    if owner != r.kind:
        raise MetaLMConfigError(f"encoder {r.name!r}: {r.source} is a {owner} encoder")
    try:
        backbone, architecture, folder = modality.load_backbone(r)
    except MetaLMConfigError:
        raise
    except ValueError as err:  # a field the backbone cannot take (e.g. a `feature_layer` it lacks)
        raise MetaLMConfigError(f"encoder {r.name!r}: {err}") from None
    spec: dict[str, Any] = {
        "name": r.name,
        "kind": r.kind,
        "connector": r.connector,
        "trainable_layers": r.trainable_layers,
        "initialized_from": r.source,
        **architecture,
    }
    preprocessor = modality.complete_spec(r, spec, backbone, folder, decoder_tok)
    return spec, backbone, preprocessor


def build_metalm(recipe: ModelRecipe) -> tuple[MetaLMForCausalLM, MetaLMProcessor]:
    """Build the model and its processor from a recipe (loading pretrained parts where named)."""
    tok = _decoder_tokenizer(recipe)
    decoder = _build_decoder(recipe, tok)
    specs, backbones, preprocessors = [], {}, {}
    for r in recipe.encoders:
        spec, backbones[r.name], preprocessors[r.name] = _build_encoder(r, tok)
        specs.append(spec)
    config = MetaLMConfig(
        text_config=decoder.config,
        encoders=specs,
        semi_causal=recipe.semi_causal,
        decoder_trainable=recipe.decoder_trainable,
    )
    config._attn_implementation = recipe.attn_implementation
    model = MetaLMForCausalLM(config, decoder=decoder, encoder_backbones=backbones)
    processor = MetaLMProcessor(config, tok, preprocessors)
    match_connector_scale(model, processor)
    return model, processor


def dock_encoders(
    model: MetaLMForCausalLM, processor: MetaLMProcessor, recipes: list[EncoderRecipe]
) -> dict[str, float]:
    """Dock encoders a built (e.g. saved and loaded) model lacks: each backbone loads as its recipe says
    and gets a fresh connector, initialised on the decoder's embedding scale as in `build_metalm`; the
    decoder, the other encoders and their connectors keep their weights. Adds each encoder's preprocessor
    to `processor`. Returns the connector scale factors by name."""
    for r in recipes:
        if r.name in model.encoders:
            raise MetaLMConfigError(
                f"encoder {r.name!r}: the model already has an encoder of that name (it has: "
                f"{', '.join(model.encoders)})"
            )
    for r in recipes:
        spec, backbone, processor.preprocessors[r.name] = _build_encoder(r, processor.tokenizer)
        model.add_encoder(spec, backbone)
    return match_connector_scale(model, processor, [r.name for r in recipes])


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@torch.no_grad()
def embedding_rms(model: MetaLMForCausalLM, processor: MetaLMProcessor) -> float:
    """RMS of the decoder's input embeddings of real words, after its own scaling (Gemma: x sqrt(d)),
    since that is what the decoder adds the encoded slots to."""
    ids = torch.tensor([processor.tokenize(PROBE_TEXT)], device=model.device)
    return _rms(model.get_input_embeddings()(ids))


@torch.no_grad()
def connector_rms(model: MetaLMForCausalLM, processor: MetaLMProcessor, name: str) -> float:
    """RMS of encoder `name`'s projected slot vectors on the probe input (model in eval mode)."""
    spec = model.config.encoder_spec(name)
    part = get_modality(spec["kind"]).probe_part(spec)
    batch = processor([[part]], add_bos=False)
    payload = to_device(batch["encoder_inputs"][name], model.device)
    return _rms(model.encode(name, payload))


def match_connector_scale(
    model: MetaLMForCausalLM, processor: MetaLMProcessor, names: list[str] | None = None
) -> dict[str, float]:
    """Initialise every connector (or those of encoders `names`) so that its outputs land on the decoder's embedding scale.

    Initialisation, not a normalisation layer: a pretrained decoder's embeddings have their own scale
    (Gemma-3 270M: RMS about 1 after its sqrt(d) factor; a fresh decoder: about 0.02), and a connector
    initialised for neither makes encoded slots tens of times louder or quieter than the words around
    them. The connector's last affine module (the Linear of a linear or MLP connector, the resampler's
    final LayerNorm) is multiplied by embedding RMS / output RMS measured on a probe input, which scales
    its output by exactly that factor; training is then free to move it. Nothing is added to the model,
    so checkpoints keep their format. Returns the factors by encoder name."""
    was_training = model.training
    model.eval()  # dropout off, and BatchNorm statistics must not move while probing
    target = embedding_rms(model, processor)
    factors: dict[str, float] = {}
    try:
        for spec in model.config.encoders:
            name = spec["name"]
            if names is not None and name not in names:
                continue
            affine = [m for m in model.connectors[name].modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
            before = connector_rms(model, processor, name)
            if not affine or before == 0.0:
                continue
            factors[name] = target / before
            with torch.no_grad():
                affine[-1].weight.mul_(factors[name])
                if affine[-1].bias is not None:
                    affine[-1].bias.mul_(factors[name])
            logger.info(
                "connector %r: output RMS %.4g scaled to the decoder's embedding RMS %.4g",
                name,
                before,
                target,
            )
    finally:
        model.train(was_training)
    return factors

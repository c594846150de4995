"""MetaLMConfig: a decoder config plus named encoder specs, connectors and semi-causal settings."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from metalm.modalities import encoder_kinds, get_modality
from metalm.model.connectors import CONNECTOR_TYPES, positions_problem
from metalm.model.hf_config import MetaLMConfigError, config_from_dict

__all__ = ["DEFAULT_SEMI_CAUSAL", "MetaLMConfig", "MetaLMConfigError", "normalize_encoder_spec"]

# Fields every encoder spec may carry; its kind's plugin adds its own (`Modality.spec_defaults`), and
# anything else is a typo and raises.
_COMMON_ENCODER_KEYS = {
    "name",
    "kind",
    "backbone",
    "config",
    "connector",
    "trainable_layers",
    "num_slots",
    "initialized_from",
}
_CONNECTOR_KEYS = {"type", "hidden_size", "input_norm", "positions", "num_queries", "num_layers", "num_heads"}

DEFAULT_SEMI_CAUSAL = {
    # Paper defaults for the language model (docs/method.md); small presets scale the spans down.
    "span_min": 64,
    "span_max": 128,
    "span_fraction": 0.25,
}


def normalize_encoder_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Validate one encoder spec and fill its defaults. Raises MetaLMConfigError naming the field."""
    if not isinstance(spec, dict):
        raise MetaLMConfigError(f"encoder spec must be a dict, got {type(spec).__name__}")
    name = spec.get("name")
    where = f"encoder {name!r}" if name else "encoder spec"
    if spec.get("kind") not in encoder_kinds():
        raise MetaLMConfigError(
            f"{where}: field 'kind' must be one of {encoder_kinds()}, got {spec.get('kind')!r}"
        )
    modality = get_modality(spec["kind"])
    allowed = _COMMON_ENCODER_KEYS | set(modality.spec_defaults)
    unknown = set(spec) - allowed
    if unknown:
        raise MetaLMConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if not isinstance(name, str) or not name.isidentifier():
        raise MetaLMConfigError(f"{where}: field 'name' must be a Python identifier, got {name!r}")
    out = copy.deepcopy(spec)
    out.setdefault("backbone", "hf")
    if out["backbone"] not in modality.backbones:
        raise MetaLMConfigError(
            f"{where}: field 'backbone' of a {out['kind']} encoder must be one of {modality.backbones}, "
            f"got {out['backbone']!r}"
        )
    if out["backbone"] == "hf":
        cfg = out.get("config")
        if isinstance(cfg, PreTrainedConfig):
            out["config"] = cfg.to_dict()
        elif not isinstance(cfg, dict) or "model_type" not in cfg:
            raise MetaLMConfigError(f"{where}: field 'config' must be an HF config dict with a 'model_type'")
    out["connector"] = _normalize_connector(out.get("connector"), where)
    layers = out.setdefault("trainable_layers", None)
    if layers is not None and (not isinstance(layers, int) or layers < 0):
        raise MetaLMConfigError(f"{where}: field 'trainable_layers' must be null (all) or an int >= 0")
    for key, default in modality.spec_defaults.items():
        out.setdefault(key, copy.deepcopy(default))
    try:
        modality.check_spec(out)
    except ValueError as err:
        raise MetaLMConfigError(f"{where}: {err}") from err
    return out


def _normalize_connector(connector: str | dict[str, Any] | None, where: str) -> dict[str, Any]:
    connector = connector or {"type": "linear"}
    if isinstance(connector, str):
        connector = {"type": connector}
    bad = set(connector) - _CONNECTOR_KEYS
    if bad:
        raise MetaLMConfigError(f"{where}: connector has unknown field(s) {sorted(bad)}")
    if connector.get("type") not in CONNECTOR_TYPES:
        raise MetaLMConfigError(
            f"{where}: field 'connector.type' must be one of {CONNECTOR_TYPES}, got {connector.get('type')!r}"
        )
    problem = positions_problem(connector["type"], connector.get("positions"), None, slots_known=False)
    if problem:  # the slot count is the built encoder's: build_connector checks it
        raise MetaLMConfigError(f"{where}: field 'connector.positions': {problem}")
    if connector["type"] == "resampler":
        connector.setdefault("num_queries", 32)
        connector.setdefault("num_layers", 2)
        connector.setdefault("num_heads", 8)
    return connector


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", "./", "../")) or os.path.exists(value)


def _strip_local_paths(d: dict[str, Any]) -> None:
    """Drop the folders this machine loaded the parts from from a serialised config (in place): HF's
    `_name_or_path` (set again at load time) at every level, and an encoder's `initialized_from` when it
    is a local folder (its name stays, as a hint). A config.json must not reveal or depend on them."""
    d.pop("_name_or_path", None)
    source = d.get("initialized_from")
    if isinstance(source, str) and _is_local_path(source):
        d["initialized_from"] = Path(source).name
    for value in d.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                _strip_local_paths(item)


class MetaLMConfig(PreTrainedConfig):
    r"""Configuration of a MetaLM: a causal decoder (the interface) and named bidirectional encoders.

    Args:
        text_config: the decoder's HF config (any `AutoModelForCausalLM` architecture) or its dict.
        encoders: a list of encoder specs (dicts): `name`, `kind` (a registered modality: text, vision;
            see `metalm.modalities`), `backbone` (`hf` = any `AutoModel` from `config`; a vision encoder
            may name `efficientnet_lite0`), `connector` (`linear`, `mlp`, `resampler`), `trainable_layers`
            (None = all; N = all frozen except the last N layers), `num_slots`, and the fields of its
            kind (text: `max_length`, `prefix_ids`/`suffix_ids` around a span, `pad_id`; vision:
            `image_size`).
        semi_causal: span sampling settings (`span_min`, `span_max`, `span_fraction`).
        decoder_trainable: False freezes the decoder (the paper's single-task finetuning protocol).
    """

    model_type = "metalm"
    # There is no meaningful default decoder, so HF must not build a bare MetaLMConfig() to diff against.
    has_no_defaults_at_init = True
    # The plain `sub_configs` mapping works across transformers 5.x (newer releases also accept
    # `sub_configs_defaults`); the dict → config conversion is done here so it does not depend on either.
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PreTrainedConfig | None = None
    encoders: list | None = None
    semi_causal: dict | None = None
    decoder_trainable: bool = True
    tie_word_embeddings: bool = False

    # transformers' PreTrainedConfig reads every attribute through two Python-level hooks (its
    # `attribute_map` and per-layer configs), ~1.5 µs a read; building a batch reads these for every encoded
    # segment (thousands a batch). None of them is mapped or per-layer, so they are read directly.
    _READ_DIRECTLY = frozenset({"encoders", "encoder_spec", "num_slots", "encoders_of_kind"})

    def __getattribute__(self, key: str) -> Any:
        if key in MetaLMConfig._READ_DIRECTLY:
            return object.__getattribute__(self, key)
        return super().__getattribute__(key)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.text_config is None:
            raise MetaLMConfigError("MetaLMConfig needs `text_config`: the decoder's config or its dict")
        if isinstance(self.text_config, dict):
            self.text_config = config_from_dict(self.text_config, "text_config")
        super().__post_init__(**kwargs)
        self.encoders = [normalize_encoder_spec(s) for s in (self.encoders or [])]
        names = [s["name"] for s in self.encoders]
        if len(set(names)) != len(names):
            raise MetaLMConfigError(f"encoder names must be unique, got {names}")
        self.semi_causal = {**DEFAULT_SEMI_CAUSAL, **(self.semi_causal or {})}
        sc = self.semi_causal
        if not (1 <= sc["span_min"] <= sc["span_max"]):
            raise MetaLMConfigError(f"semi_causal: need 1 <= span_min <= span_max, got {sc}")
        if not (0.0 <= sc["span_fraction"] < 1.0):
            raise MetaLMConfigError(
                f"semi_causal: span_fraction must be in [0, 1), got {sc['span_fraction']}"
            )
        # The decoder owns the vocabulary and special tokens; mirror them so generate() finds them.
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.text_config, key, None) is not None:
                setattr(self, key, getattr(self.text_config, key))
        # The decoder ties its own head to its own embeddings; that is the decoder's business.
        self.tie_word_embeddings = False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        _strip_local_paths(out)
        return out

    def encoder_spec(self, name: str) -> dict[str, Any]:
        for spec in self.encoders:
            if spec["name"] == name:
                return spec
        raise MetaLMConfigError(
            f"no encoder named {name!r}; this model has {[s['name'] for s in self.encoders]}"
        )

    def context_length(self) -> int | None:
        """The decoder's maximum number of positions, if its config states one."""
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(self.text_config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def encoders_of_kind(self, kind: str) -> list[str]:
        return [s["name"] for s in self.encoders if s["kind"] == kind]

    def num_slots(self, name: str, payload_tokens: int | None = None) -> int:
        """Decoder positions an encoded segment occupies: K for a resampler, else what the encoder's kind
        says (a text span: its token count `payload_tokens`; an image: the measured `num_slots`)."""
        spec = self.encoder_spec(name)
        if spec["connector"]["type"] == "resampler":
            return int(spec["connector"]["num_queries"])
        try:
            return get_modality(spec["kind"]).num_slots(spec, payload_tokens)
        except ValueError as err:
            raise MetaLMConfigError(f"encoder {name!r}: {err}") from err

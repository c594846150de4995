"""Loading a training config: YAML files (following ``extends``) and ``key.path=value`` overrides, validated
into a :class:`~metalm.training.config_schema.TrainConfig`; every problem (unknown key, wrong type, bad value,
missing file) raises :class:`~metalm.training.config_schema.ConfigError` whose message names the file (or the
override) and the key path, e.g. ``configs/x.yaml: optim.lr: expected float, got 'abc'``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from metalm.training.config_messages import config_error
from metalm.training.config_messages import describe as _describe
from metalm.training.config_schema import INIT_FROM_FIXED, ConfigError, TrainConfig

__all__ = ["apply_overrides", "config_from_dict", "config_to_dict", "load_config"]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, shown: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{shown}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping at the top level, got {_describe(data)}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{shown}: extends: expected a file name, got {_describe(parent)}")
    # `extends` is relative to the file that names it.
    base_path = (path.parent / parent).resolve()
    if base_path in chain:
        raise ConfigError(f"{shown}: extends: {parent!r} extends itself (a cycle)")
    base = _read_yaml(base_path, str(Path(shown).parent / parent), (*chain, path.resolve()))
    if data.get("init_from") is not None and isinstance(base.get("model"), dict):
        # A file that starts from a saved model keeps its base's settings but not the base's architecture:
        # the saved model fixes the decoder, tokenizer and encoders.
        base["model"] = {k: v for k, v in base["model"].items() if k not in INIT_FROM_FIXED}
    return _deep_merge(base, data)


def _parse_override(text: str) -> tuple[list[str | int], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. optim.lr=1e-4")
    parts: list[str | int] = []
    for piece in key.split("."):
        if not piece:
            raise ConfigError(f"override {text!r}: empty key in {key!r}")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse the value: {err}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, list[str | int]]:
    """Apply ``key.path=value`` overrides to raw config data in place (values parsed as YAML; a number
    in the path indexes a list: ``data.streams.0.weight=2``). Returns {override text: key parts}."""
    applied = {}
    for text in overrides:
        parts, value = _parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"override {text!r}: {here}: indexes a list, but the value is not one")
                if part >= len(node):
                    raise ConfigError(
                        f"override {text!r}: {here}: index out of range (the list has {len(node)})"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {here}: the value above it is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
        applied[text] = parts
    return applied


def config_from_dict(
    data: dict[str, Any], *, source: str = "<config>", overrides: list[str] | None = None
) -> TrainConfig:
    """Validate raw data (e.g. parsed YAML) into a :class:`TrainConfig`; raises :class:`ConfigError`."""
    data = copy.deepcopy(data)
    data.pop("extends", None)
    applied = apply_overrides(data, list(overrides or []))
    try:
        cfg = TrainConfig.model_validate(data, context={"source": source})
    except ValidationError as err:
        raise ConfigError(config_error(err, data, applied, source, TrainConfig)) from None
    cfg._source = source
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (following ``extends``), apply ``key=value`` overrides, validate."""
    shown = str(path)
    data = _read_yaml(Path(path), shown)
    return config_from_dict(data, source=shown, overrides=overrides)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data (YAML/JSON-ready) for a config; `config_from_dict` reads it back."""
    return cfg.model_dump(mode="json")

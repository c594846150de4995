"""Start a run from a saved MetaLM (`init_from`): load it, apply the config's overrides, dock new encoders.

The saved model brings its decoder, tokenizer, encoders and freezing. The config may override
`semi_causal`, `decoder_trainable` and per-encoder `trainable_layers`, may give a vision connector learned
slot positions (`connector_positions`), and may list `model.encoders` the
saved model lacks: those are docked with fresh connectors (`metalm.recipe.dock_encoders`), so a model that
already answers about images can learn to hear (configs/speech.yaml).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml

from metalm.data.processor import MetaLMProcessor
from metalm.model.configuration_metalm import MetaLMConfigError
from metalm.model.connectors import SlotPositions, positions_problem
from metalm.model.modeling_metalm import MetaLMForCausalLM
from metalm.training.config import ConfigError, TrainConfig
from metalm.training.paths import relative_path_hint

__all__ = ["load_init_from", "preset_that_writes"]

logger = logging.getLogger(__name__)


def preset_that_writes(folder: str, config_source: str | None) -> Path | None:
    """The config beside `config_source` whose run writes `folder` (its `run.output_dir` + `/final`), so
    a missing `init_from` can say what to train first; None when no neighbour does."""
    if not config_source or config_source.startswith("<"):
        return None
    for path in sorted(Path(config_source).parent.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        run = data.get("run") if isinstance(data, dict) else None
        output_dir = run.get("output_dir") if isinstance(run, dict) else None
        if isinstance(output_dir, str) and Path(output_dir) / "final" == Path(folder):
            return path
    return None


def _missing_folder_error(cfg: TrainConfig) -> ConfigError:
    where = cfg.source or "<config>"
    preset = preset_that_writes(cfg.init_from, cfg.source)
    if preset is not None:
        return ConfigError(
            f"{where}: init_from: {cfg.init_from!r} does not exist yet (no config.json): train it first with "
            f"`metalm train {preset}`, which writes it, or point init_from elsewhere"
        )
    return ConfigError(
        f"{where}: init_from: {cfg.init_from!r} is not a saved MetaLM folder "
        "(no config.json); train the model it names first, or point init_from elsewhere"
        + relative_path_hint(cfg.init_from, cfg.source)
    )


def load_init_from(cfg: TrainConfig) -> tuple[MetaLMForCausalLM, MetaLMProcessor]:
    """The model and processor of `cfg.init_from`, with the config's overrides and new encoders."""
    from metalm.training.model_setup import describe_model  # model_setup imports this module

    if not (Path(cfg.init_from) / "config.json").is_file():
        raise _missing_folder_error(cfg)
    model = MetaLMForCausalLM.from_pretrained(
        cfg.init_from, attn_implementation=cfg.model.attn_implementation
    )
    processor = MetaLMProcessor.from_pretrained(cfg.init_from, config=model.config)
    if cfg.model.semi_causal:
        model.config.semi_causal = {**model.config.semi_causal, **cfg.model.semi_causal}
    if cfg.model.decoder_trainable is not None:
        model.config.decoder_trainable = cfg.model.decoder_trainable
    _dock_new_encoders(cfg, model, processor)
    _override_trainable_layers(cfg, model)
    _add_connector_positions(cfg, model)
    model.apply_freezing()
    logger.info("init_from %s: %s", cfg.init_from, describe_model(model))
    return model, processor


def _dock_new_encoders(cfg: TrainConfig, model: MetaLMForCausalLM, processor: MetaLMProcessor) -> None:
    from metalm.recipe import dock_encoders

    recipes = [copy.copy(r) for r in cfg.model.encoders or []]
    if not recipes:
        return
    try:
        dock_encoders(model, processor, recipes)
    except MetaLMConfigError as err:
        raise ConfigError(f"{cfg.source or '<config>'}: model.encoders: {err}") from None
    logger.info("init_from %s: docked new encoder(s) %s", cfg.init_from, ", ".join(r.name for r in recipes))


def _override_trainable_layers(cfg: TrainConfig, model: MetaLMForCausalLM) -> None:
    """`model.trainable_layers` ({encoder name: N}) replaces the saved model's per-encoder setting (a
    model pre-trained with frozen encoders can be finetuned with their top layers training)."""
    for name, layers in (cfg.model.trainable_layers or {}).items():
        _saved_encoder(cfg, model, f"model.trainable_layers.{name}", name)["trainable_layers"] = layers


def _saved_encoder(cfg: TrainConfig, model: MetaLMForCausalLM, field: str, name: str) -> dict:
    """The saved model's spec of encoder `name`, which the config's `field` names; a ConfigError that lists
    the encoders it has when it has none of that name."""
    specs = {spec["name"]: spec for spec in model.config.encoders}
    if name not in specs:
        raise ConfigError(
            f"{cfg.source or '<config>'}: {field}: the model in init_from has no encoder {name!r} (it has: "
            f"{', '.join(specs) or 'none'})"
        )
    return specs[name]


def _add_connector_positions(cfg: TrainConfig, model: MetaLMForCausalLM) -> None:
    """`model.connector_positions` ({encoder name: learned}) adds learned slot positions to a saved model's
    connector, zero at first (so the model starts as saved); a connector that has them keeps its own."""
    for name in cfg.model.connector_positions or {}:
        spec = _saved_encoder(cfg, model, f"model.connector_positions.{name}", name)
        if spec["connector"].get("positions") == "learned":
            continue
        problem = positions_problem(spec["connector"]["type"], "learned", spec.get("num_slots"))
        if problem:
            raise ConfigError(
                f"{cfg.source or '<config>'}: model.connector_positions.{name}: encoder {name!r}: connector "
                f"positions: {problem} (this one: a {spec['connector']['type']} connector on a {spec['kind']} "
                "encoder)"
            )
        connector, width = model.connectors[name], model.config.text_config.hidden_size
        weight = next(connector.parameters())  # the positions join it on its device, in its dtype
        connector.positions = SlotPositions(spec["num_slots"], width).to(weight.device, weight.dtype)
        spec["connector"]["positions"] = "learned"  # saved with the model, so it loads with them
        logger.info(
            "init_from %s: connector %r gains learned slot positions (zero at first)", cfg.init_from, name
        )

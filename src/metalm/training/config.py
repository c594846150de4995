"""Training configuration: pydantic models, loaded from YAML with strict validation.

A config file has the sections ``model``, ``data``, ``optim``, ``run`` and optionally ``init_from`` and
``extends`` (see ``docs/training.md``). :func:`load_config` turns YAML plus ``key=value`` overrides into a
:class:`TrainConfig`; every problem (unknown key, wrong type, bad value, missing file) raises
:class:`ConfigError` whose message names the file (or the override) and the key path, e.g.
``configs/x.yaml: optim.lr: expected float, got 'abc'``.

One module per job, all imported from here: the schema (:mod:`metalm.training.config_schema`), the
instruction templates and request layouts (:mod:`metalm.training.config_templates`), loading YAML and
overrides (:mod:`metalm.training.config_loading`) and the wording of errors
(:mod:`metalm.training.config_messages`).
"""

from __future__ import annotations

from metalm.training.config_loading import apply_overrides, config_from_dict, config_to_dict, load_config
from metalm.training.config_schema import (
    INIT_FROM_FIXED,
    ConfigError,
    DataConfig,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    RunConfig,
    StreamConfig,
    TrainConfig,
)
from metalm.training.config_templates import (
    DEFAULT_PROMPTS,
    DEFAULT_TEMPLATES,
    OPTIONS_JOINER,
    TEMPLATE_FIELDS,
    check_template,
    layouts_from_streams,
    stream_record_kind,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_TEMPLATES",
    "INIT_FROM_FIXED",
    "OPTIONS_JOINER",
    "TEMPLATE_FIELDS",
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StreamConfig",
    "TrainConfig",
    "apply_overrides",
    "check_template",
    "config_from_dict",
    "config_to_dict",
    "layouts_from_streams",
    "load_config",
    "stream_record_kind",
]

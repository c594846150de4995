"""Training: YAML configs (`config`), data streams (`data`), one optimizer step (`step`), the accelerate
trainer's loop around it (`trainer`), and beside it `model_setup`, `validation`, `run_state` (resume),
`run_log`, `checkpoint`, `metrics`, `optimizer`, `parallel` and `cli`.

`from metalm.training import load_config, train` is the short way in; the names are imported lazily so
that reading a config does not import accelerate.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ConfigError": "metalm.training.config",
    "TrainConfig": "metalm.training.config",
    "load_config": "metalm.training.config",
    "config_from_dict": "metalm.training.config",
    "DataStream": "metalm.training.data",
    "build_data": "metalm.training.data",
    "TrainResult": "metalm.training.trainer",
    "Trainer": "metalm.training.trainer",
    "train": "metalm.training.trainer",
    "train_main": "metalm.training.cli",
    "add_train_parser": "metalm.training.cli",
    "find_checkpoint": "metalm.training.checkpoint",
    "verify_checkpoint": "metalm.training.checkpoint",
    "shard_model": "metalm.training.parallel",
    "MicroBatch": "metalm.training.step",
    "StepResult": "metalm.training.step",
    "train_step": "metalm.training.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalm.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

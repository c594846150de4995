"""Building blocks of the results scripts (``scripts/interface_results.py``, ``scripts/paper_claims.py``):
train a config once, load a saved model, evaluate once. Each step writes its outputs to a
folder and is skipped when they are already there, so an interrupted script resumes where it stopped."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.prediction_files import prediction_files

logger = logging.getLogger(__name__)

__all__ = ["cached_eval", "load_model", "run_differences", "train_once"]


# What a trained run must share with the config asked for to be reused: what makes the model, not its logging.
_SAME_MODEL_KEYS = ("model", "data", "optim", "init_from", "run.seed")


def train_once(config: str | Path, run_dir: Path, overrides: Sequence[str] = ()) -> Path:
    """``run_dir/final``, trained from ``config`` (with ``run.output_dir=run_dir`` and ``overrides``) unless
    it exists. An existing run whose saved ``config.yaml`` differs from that config in what makes the model
    (``_SAME_MODEL_KEYS``: another init, other data or steps) is an error, not a silent reuse."""
    from metalm.training.config import load_config
    from metalm.training.trainer import train

    final = run_dir / "final"
    wanted = load_config(config, [f"run.output_dir={run_dir}", *overrides])
    if not (final / "config.json").is_file():
        logger.info("training %s -> %s", Path(config).name, run_dir)
        train(wanted)
        return final
    differences = run_differences(run_dir, wanted)
    if differences:
        raise RuntimeError(
            f"{run_dir} was trained from another config than {Path(config).name} with {list(overrides)}: "
            + "; ".join(differences[:4])
            + f". Move or remove {run_dir} to train it afresh, or give the scripts another --runs folder"
        )
    return final


def run_differences(run_dir: Path, wanted: Any) -> list[str]:
    """How the run saved in ``run_dir`` (its ``config.yaml``) differs from the config ``wanted``, in what
    makes the model: "key: saved -> wanted" lines, none when equal (or when the run saved no config).
    Paths (``init_from``) count as equal when they name the same folder, however written; a setting added
    since the run was saved counts as its default (read back through the config schema)."""
    import yaml

    from metalm.training.config import ConfigError
    from metalm.training.config_loading import config_from_dict, config_to_dict

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        logger.warning("%s has no config.yaml: reused without checking what it was trained from", run_dir)
        return []
    raw = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    try:
        raw = config_to_dict(config_from_dict(raw, source=str(saved_file)))
    except ConfigError:  # a setting since removed: compare what was written
        pass
    saved = _flat(raw)
    asked = _flat(config_to_dict(wanted))  # JSON-ready, as config.yaml was written from it
    out = []
    for key in sorted(set(saved) | set(asked)):
        if not key.startswith(_SAME_MODEL_KEYS) or _same_value(key, saved.get(key), asked.get(key)):
            continue
        out.append(f"{key}: {_short(saved.get(key))} -> {_short(asked.get(key))}")
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as dotted keys (a list item by its index: ``data.streams.2.weight``)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _same_value(key: str, saved: Any, asked: Any) -> bool:
    if key == "init_from" and isinstance(saved, str) and isinstance(asked, str):
        a, b = Path(saved), Path(asked)
        return a.resolve() == b.resolve() or a.parts[-2:] == b.parts[-2:]
    return saved == asked


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def load_model(folder: Path) -> tuple[Any, Any]:
    """A saved MetaLM and its processor, in eval mode."""
    from metalm import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    model = MetaLMForCausalLM.from_pretrained(folder).eval()
    return model, MetaLMProcessor.from_pretrained(folder, config=model.config)


def cached_eval(
    out: Path, model, processor, task: Any, shots: Sequence[int], seeds: Sequence[int], **kw: Any
) -> dict[str, Any]:
    """`metalm eval` of ``task`` (a name, a Task or a list of them) into ``out``; its summary is reused when
    one exists for the same shots, seeds, limit, per-group cap, calibration and choice of demonstrations and
    holds every task asked (a page must not state a limit its cached figures were not measured with, nor
    lose a task added to a step). Evaluated again, the asked tasks' earlier prediction files are removed
    first: a seed or k no longer asked must not be read with the new ones. Like `metalm eval`, it serves the
    model's frozen encoder parts from the feature cache (`cache_features`; a cache already attached is kept)."""
    from metalm.evaluation.demonstrations import CALIBRATION
    from metalm.evaluation.retrieval import SIMILARITY
    from metalm.evaluation.runner import evaluate

    summary = out / "summary.json"
    names = [task] if isinstance(task, str) else [getattr(t, "name", t) for t in task]
    if summary.is_file():
        cached = json.loads(summary.read_text())
        asked = {
            "shots": list(shots),
            "seeds": list(seeds),
            "limit": kw.get("limit"),
            "per_group": kw.get("per_group"),
            "calibration": CALIBRATION if kw.get("calibrate") else None,
            "demonstrations": SIMILARITY if kw.get("demonstrations") == "similar" else None,
        }
        found = {key: cached.get(key) for key in asked}
        if found == asked and set(names) <= set(cached.get("results", {})):
            return cached
        logger.info("%s: cached for %s, asked for %s: evaluating again", out, found, asked)
    for name in names:
        for stale in prediction_files(out, name):
            stale.unlink()
    from metalm.model.feature_cache import cache_features

    cache_features(model, processor)
    return evaluate(model, processor, task, shots=shots, seeds=seeds, out_dir=out, **kw)

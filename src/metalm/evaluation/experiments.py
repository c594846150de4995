"""Building blocks of the results scripts (``scripts/interface_results.py``, ``scripts/paper_claims.py``):
train a config once, load a saved model, evaluate once. Each step writes its outputs to a
folder and is skipped when they are already there, so an interrupted script resumes where it stopped."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["cached_eval", "load_model", "train_once"]


def train_once(config: str | Path, run_dir: Path, overrides: Sequence[str] = ()) -> Path:
    """``run_dir/final``, trained from ``config`` (with ``run.output_dir=run_dir`` and ``overrides``) unless
    it exists."""
    from metalm.training.config import load_config
    from metalm.training.trainer import train

    final = run_dir / "final"
    if not (final / "config.json").is_file():
        logger.info("training %s -> %s", Path(config).name, run_dir)
        train(load_config(config, [f"run.output_dir={run_dir}", *overrides]))
    return final


def load_model(folder: Path) -> tuple[Any, Any]:
    """A saved MetaLM and its processor, in eval mode."""
    from metalm import MetaLMProcessor
    from metalm.model.modeling_metalm import MetaLMForCausalLM

    model = MetaLMForCausalLM.from_pretrained(folder).eval()
    return model, MetaLMProcessor.from_pretrained(folder, config=model.config)


def cached_eval(
    out: Path, model, processor, task: Any, shots: Sequence[int], seeds: Sequence[int], **kw: Any
) -> dict[str, Any]:
    """`metalm eval` of ``task`` into ``out``; its summary is reused when one exists for the same shots,
    seeds, limit, per-group cap, calibration and choice of demonstrations (a page must not state a limit its
    cached figures were not measured with)."""
    from metalm.evaluation.demonstrations import CALIBRATION
    from metalm.evaluation.retrieval import SIMILARITY
    from metalm.evaluation.runner import evaluate

    summary = out / "summary.json"
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
        if found == asked:
            return cached
        logger.info("%s: cached for %s, asked for %s: evaluating again", out, found, asked)
    return evaluate(model, processor, task, shots=shots, seeds=seeds, out_dir=out, **kw)

"""Run evaluation protocols: ``evaluate()`` (Python; ``metalm eval`` is its command line,
:mod:`metalm.evaluation.eval_cli`).

For each task, each shot count k and each seed, every evaluated example gets a prompt of k sampled
demonstrations (``metalm.evaluation.icl``; or, with ``demonstrations="similar"``, the k most like it,
:mod:`~metalm.evaluation.retrieval`) and is scored:

* ``rank``: ``batch_size`` prompts run once each (left-padded), and every option is read as a
  continuation from its prompt's KV cache; the option's score is the sum (or mean) of its tokens'
  log-probabilities; the best option (or, calibrated, the best relative to a content-free query's) is
  the prediction.
* ``generate``: greedy decoding of left-padded prompts, cut at the task's stop strings.

Outputs in ``out_dir``: ``predictions-<task>-k<k>-s<seed>.jsonl`` (per example: id, prompt summary,
prediction, gold, score), ``summary.json`` (every metric per seed, mean and std over seeds, the protocol)
and ``results.md`` (task x k, mean ± std over seeds).

The jobs beside this one: the model calls (:mod:`~metalm.evaluation.scoring`: ``score_samples``,
``generate_samples``), one task's runs over k and seeds (:mod:`~metalm.evaluation.task_runs`), prompts
(:mod:`~metalm.evaluation.icl`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.data.processor import MetaLMProcessor
from metalm.evaluation.demonstrations import CALIBRATION, copying_markdown
from metalm.evaluation.icl import resolve_baseline
from metalm.evaluation.own_data import group_markdown
from metalm.evaluation.retrieval import DEMONSTRATION_CHOICES, SIMILARITY
from metalm.evaluation.scoring import decoder_context_length, generate_samples, score_samples
from metalm.evaluation.task_runs import evaluate_task, subset_examples
from metalm.evaluation.tasks import METRICS, Task, TaskError, get_task, in_model_layout, with_overrides

logger = logging.getLogger("metalm.evaluation")

__all__ = [
    "decoder_context_length",
    "evaluate",
    "generate_samples",
    "score_samples",
    "subset_examples",
]


def _results_markdown(summary: dict[str, Any]) -> str:
    shots = sorted({int(k) for t in summary["results"].values() for k in t})
    head = "| task | metric | " + " | ".join(f"k={k}" for k in shots) + " |"
    lines = [
        "# metalm evaluation",
        "",
        f"- model: `{summary['model']}`",
        f"- mode: {summary['mode']}",
        f"- seeds: {', '.join(map(str, summary['seeds']))} (k=0 is deterministic and runs once)",
        f"- limit: {summary['limit'] if summary['limit'] is not None else 'all'}",
        *([f"- at most {summary['per_group']} examples per group"] if summary.get("per_group") else []),
        *([f"- calibration: {summary['calibration']}"] if summary.get("calibration") else []),
        *(
            [f"- demonstrations: {summary['demonstrations']} (one run per k)"]
            if summary.get("demonstrations")
            else []
        ),
        "- scores x100 (accuracy, F1, BLEU-4, ROUGE-L: 0-100; CIDEr-D: 0-1000, as papers print it)",
        "- mean ± std (sample std) over seeds; a score from one run (one seed, or k=0) has no spread",
        "",
        head,
        "|" + "---|" * (len(shots) + 2),
    ]
    for task, by_k in summary["results"].items():
        metric_keys = METRICS[summary["protocols"][task]["metric"]]
        for key in metric_keys:
            cells = []
            for k in shots:
                entry = by_k.get(str(k))
                if entry is None or key not in entry["mean"]:
                    cells.append("–")
                elif len(entry.get("seeds", ())) > 1:
                    cells.append(f"{entry['mean'][key]:.1f} ± {entry['std'][key]:.1f}")
                else:  # one run: a spread of 0.0 would claim a stability nobody measured
                    cells.append(f"{entry['mean'][key]:.1f}")
            lines.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines + group_markdown(summary) + copying_markdown(summary)) + "\n"


def _checked_runs(shots: Sequence[int], seeds: Sequence[int], batch_size: int) -> tuple[list[int], list[int]]:
    shots, seeds = [int(k) for k in shots], [int(s) for s in seeds]
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"shots must be non-negative integers, got {shots}")
    if not seeds:
        raise ValueError("need at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return shots, seeds


def _warn_of_choices_that_do_nothing(tasks: Sequence[Task], calibrate: bool, similar: bool) -> None:
    """A warning for each option these tasks ignore or that defeats another."""
    names = [t.name for t in tasks]
    if similar and all(t.episodes is not None for t in tasks):
        logger.warning(
            "--demos similar: %s draw their own demonstrations (episodes); nothing retrieved", names
        )
    if calibrate and not any(t.scoring == "rank" for t in tasks):
        logger.warning("--calibrate applies to ranked tasks; %s generate their answers, uncalibrated", names)
    if calibrate and similar and any(t.scoring == "rank" and t.episodes is None for t in tasks):
        # Measured on BBC topics (docs/demonstrations.md): calibrated below ranked in 5 of 6 rows.
        logger.warning(
            "--calibrate with --demos similar: the content-free query sees the same retrieved demonstrations "
            "and discounts the answer they share, which is what retrieval brings; rank without --calibrate"
        )


def evaluate(
    model,
    processor: MetaLMProcessor,
    task: Task | str | Sequence[Task | str],
    shots: Sequence[int] = (0,),
    seeds: Sequence[int] = (0,),
    limit: int | None = None,
    batch_size: int = 8,
    *,
    out_dir: str | Path | None = None,
    baseline: bool | None = None,
    separator: str | None = None,
    normalization: str | None = None,
    progress: bool = True,
    model_name: str | None = None,
    per_group: int | None = None,
    calibrate: bool = False,
    demonstrations: str = "random",
) -> dict[str, Any]:
    """Evaluate ``model`` on one or more tasks for every k in ``shots`` and every seed.

    ``task``: a :class:`Task`, a built-in name (``easyvqa``, ``easyvqa-caption``, ``bbc-topic``) or a task
    file path, or a list of them. ``baseline=None`` picks baseline mode (inputs as decoder text) for a model
    without a text encoder; ``separator=None`` separates demonstrations with the decoder's EOS token;
    ``normalization`` overrides every rank task's ``sum`` / ``mean``. k = 0 runs once (with the first seed).
    ``per_group``: at most that many examples of each group (e.g. easy-VQA's question types), so that a rare
    group is measured on as many examples as a common one (``subset_examples``). ``calibrate``: ranked
    tasks choose by contextual calibration against a content-free query (:mod:`metalm.evaluation.demonstrations`);
    generated tasks are unchanged. ``demonstrations``: ``random`` (a draw per example and seed, the paper's
    protocol) or ``similar`` (the pool examples most like each query under the model's encoders; episode
    tasks draw their own).

    Returns the summary (also written to ``out_dir/summary.json`` with ``results.md`` and the prediction
    files when ``out_dir`` is given): ``{"results": {task: {str(k): {"seeds": {str(seed): metrics},
    "mean": ..., "std": ..., "n": ...}}}, "protocols": ..., ...}``.
    """
    tasks = [get_task(t) for t in (task if isinstance(task, list | tuple) else [task])]
    tasks = [in_model_layout(t, model.config) for t in tasks]
    if normalization is not None:
        tasks = [with_overrides(t, normalization=normalization) if t.scoring == "rank" else t for t in tasks]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"task names must be unique, got {names}")
    shots, seeds = _checked_runs(shots, seeds, batch_size)
    if demonstrations not in DEMONSTRATION_CHOICES:
        raise TaskError(f"demonstrations must be one of {DEMONSTRATION_CHOICES}, got {demonstrations!r}")
    similar = demonstrations == "similar"
    _warn_of_choices_that_do_nothing(tasks, calibrate, similar)
    baseline = resolve_baseline(model, baseline)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    summary: dict[str, Any] = {
        "model": model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "mode": "baseline (inputs as decoder text)" if baseline else "metalm (inputs encoded)",
        "separator": "decoder EOS token" if separator is None else separator,
        "shots": shots,
        "seeds": seeds,
        "limit": limit,
        "per_group": per_group,
        "calibration": CALIBRATION if calibrate else None,
        "demonstrations": SIMILARITY if similar else None,
        "protocols": {t.name: t.settings() for t in tasks},
        "results": {},
    }
    try:
        for t in tasks:
            summary["results"][t.name] = evaluate_task(
                model, processor, t, shots, seeds, limit=limit, per_group=per_group, out=out, baseline=baseline,
                separator=separator, batch_size=batch_size, progress=progress, calibrate=calibrate,
                similar=similar,
            )  # fmt: skip
    finally:
        model.train(was_training)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        (out / "results.md").write_text(_results_markdown(summary))
    return summary

"""``metalm eval``: load a saved MetaLM and its processor, evaluate (:func:`metalm.evaluation.runner.evaluate`),
write the outputs and print ``results.md``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metalm.data.processor import MetaLMProcessor
from metalm.evaluation.own_data import data_tasks, read_own_data
from metalm.evaluation.retrieval import DEMONSTRATION_CHOICES
from metalm.evaluation.runner import evaluate
from metalm.evaluation.tasks import TaskError, get_task

__all__ = ["add_eval_parser", "eval_main"]


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{what} is empty")
    return values


def eval_main(
    model: str,
    task: list[str],
    shots: str = "0",
    seeds: str = "0",
    limit: int | None = None,
    out: str = "eval-results",
    batch_size: int = 8,
    *,
    baseline: bool | None = None,
    separator: str | None = None,
    normalization: str | None = None,
    device: str | None = None,
    data: Sequence[str] = (),
    group_by: str = "type",
    per_group: int | None = None,
    calibrate: bool = False,
    demos: str = "random",
    demo_data: str | None = None,
    feature_cache: bool = True,
) -> dict[str, Any]:
    """``metalm eval MODEL --task NAME [--task ...] [--shots 0,1,4] [--seeds 0,1,2] [--limit N] [--out DIR]``.

    Loads a saved MetaLM (folder from ``save_pretrained``) with its processor, evaluates, writes the
    outputs to ``out`` and prints ``results.md``. ``data``: records files evaluated in the model's trained
    layouts, grouped by ``meta.<group_by>`` (:mod:`metalm.evaluation.own_data`); ``demo_data``: the records
    their demonstrations come from (default: the same file)."""
    from transformers import AutoModelForCausalLM

    import metalm

    metalm.register()  # the Auto classes (idempotent)

    from metalm.data.layouts import layouts_of

    if isinstance(task, str):
        task = [task]
    shot_list = _int_list(shots, "shots")
    seed_list = _int_list(seeds, "seeds")
    tasks = [get_task(t) for t in task]  # fail on a bad task name or record before loading the model
    own = [(path, read_own_data(path, group_by)) for path in data]
    if not tasks and not own:
        raise TaskError("nothing to evaluate: give --task and/or --data")
    if demo_data is not None and not own:
        raise TaskError("--demo-data gives the demonstrations of --data records; give --data too")
    pool = read_own_data(demo_data, group_by) if demo_data is not None else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = AutoModelForCausalLM.from_pretrained(model).to(dev)
    processor = MetaLMProcessor.from_pretrained(model)
    if feature_cache:
        from metalm.model.feature_cache import cache_features

        cache_features(lm, processor)
    for path, by_kind in own:
        tasks += data_tasks(path, by_kind, layouts_of(lm.config), pool, demo_data)
    summary = evaluate(
        lm, processor, tasks, shots=shot_list, seeds=seed_list, limit=limit, batch_size=batch_size,
        out_dir=out, baseline=baseline, separator=separator, normalization=normalization, model_name=model,
        per_group=per_group, calibrate=calibrate, demonstrations=demos,
    )  # fmt: skip
    print((Path(out) / "results.md").read_text(), end="")
    return summary


def _eval_from_args(args: argparse.Namespace) -> int:
    eval_main(
        args.model, args.task or [], shots=args.shots, seeds=args.seeds, limit=args.limit, out=args.out,
        batch_size=args.batch_size, baseline=args.baseline, separator=args.separator,
        normalization=args.normalization, device=args.device, data=args.data or (), group_by=args.group_by,
        per_group=args.per_group, calibrate=args.calibrate, demos=args.demos, demo_data=args.demo_data,
        feature_cache=args.feature_cache,
    )  # fmt: skip
    return 0  # the `metalm` entry point turns this into the exit status


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to a subparsers object; the parsed namespace's ``func(args)`` runs it."""
    from metalm.evaluation.tasks import BUILTIN_TASKS

    p = subparsers.add_parser(
        "eval",
        help="evaluate a saved model on built-in or user tasks (zero/few-shot)",
        description="Zero/few-shot evaluation with the MetaLM protocols: demonstration inputs encoded, labels "
        "in the decoder. Writes predictions-<task>-k<k>-s<seed>.jsonl, summary.json and results.md.",
    )
    p.add_argument("model", help="a saved MetaLM folder")
    p.add_argument(
        "--task", action="append",
        help=f"built-in task ({', '.join(BUILTIN_TASKS)}) or a .yaml/.json task file; repeatable",
    )  # fmt: skip
    p.add_argument(
        "--data", action="append", metavar="RECORDS.jsonl",
        help="records (docs/data.md: vqa, image_text, classification) asked in the model's trained layout; "
        "repeatable; give --task and/or --data",
    )  # fmt: skip
    p.add_argument(
        "--demo-data", default=None, metavar="RECORDS.jsonl",
        help="with --data: draw demonstrations from these records (e.g. the training file) instead of the "
        "evaluated file itself",
    )  # fmt: skip
    p.add_argument(
        "--group-by", default="type", metavar="KEY",
        help="with --data: score per value of the records' meta.KEY, beside each group's majority answer",
    )  # fmt: skip
    p.add_argument("--shots", default="0", help="comma-separated demonstration counts, e.g. 0,1,4")
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds for demonstration sampling, e.g. 0,1,2"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N examples")
    p.add_argument(
        "--per-group", type=int, default=None, metavar="N",
        help="at most N examples of each group (easy-VQA's question types, --data's meta.KEY), so that a rare "
        "group is measured on as many as a common one; --limit then caps the total",
    )  # fmt: skip
    p.add_argument("--out", default="eval-results", help="output folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="prompts per forward pass (a ranked prompt with all its options)",
    )
    p.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=None,
        help="inputs as plain decoder text (GPT baseline); default: only for models without a text encoder",
    )  # fmt: skip
    p.add_argument("--separator", default=None, help="demonstration separator text (default: the EOS token)")
    p.add_argument(
        "--calibrate", action="store_true",
        help="ranked tasks: contextual calibration (Zhao et al. 2021): each option's probability divided by its "
        "probability after the same demonstrations and a content-free query (N/A), so that a label the "
        "demonstrations favour whatever the query says does not win for that reason; off by default",
    )  # fmt: skip
    p.add_argument(
        "--demos", choices=DEMONSTRATION_CHOICES, default="random",
        help="how each query's k demonstrations are chosen: random (a draw per example and seed, the paper's "
        "protocol) or similar (the pool examples most like the query under the model's own encoders, most "
        "similar last: RICES / KATE; one run per k)",
    )  # fmt: skip
    p.add_argument("--normalization", choices=("sum", "mean"), default=None, help="override option scoring")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--feature-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the encoders' frozen parts from the feature cache training fills ($METALM_CACHE/features): "
        "a k-shot prompt re-encodes every demonstration otherwise (default: on)",
    )
    p.set_defaults(func=_eval_from_args)
    return p

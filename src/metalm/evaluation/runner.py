"""Run evaluation protocols: ``evaluate()`` (Python) and ``metalm eval`` (CLI).

For each task, each shot count k and each seed, every evaluated example gets a prompt of k sampled
demonstrations (``metalm.evaluation.icl``) and is scored:

* ``rank``: every option of several examples goes into one right-padded forward pass as a ``Target``
  continuation of its example's prompt; the option's score is the sum (or mean) of its tokens'
  log-probabilities, read at the positions its labels mark; the best option is the prediction.
* ``generate``: greedy decoding of left-padded prompts, cut at the task's stop strings.

Outputs in ``out_dir``: ``predictions-<task>-k<k>-s<seed>.jsonl`` (per example: id, prompt summary,
prediction, gold, score), ``summary.json`` (every metric per seed, mean and std over seeds, the protocol)
and ``results.md`` (task x k, mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import random
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metalm.data.processor import InputError, MetaLMProcessor, continuation_pieces
from metalm.data.segments import Sample, TextSegment, sample_length, to_device
from metalm.evaluation.icl import (
    build_prompt,
    describe_prompt,
    encoder_fits,
    prompt_to_sample,
    resolve_baseline,
    sample_demonstrations,
)
from metalm.evaluation.own_data import data_tasks, group_markdown, group_scores, read_own_data
from metalm.evaluation.tasks import (
    METRICS,
    Example,
    Task,
    TaskError,
    get_task,
    in_model_layout,
    with_overrides,
)

__all__ = [
    "add_eval_parser",
    "decoder_context_length",
    "eval_main",
    "evaluate",
    "generate_samples",
    "score_samples",
]

SUBSET_SEED = "metalm-eval-subset"
logger = logging.getLogger("metalm.evaluation")


# ---------------------------------------------------------------------------------------------------------
# Model plumbing
# ---------------------------------------------------------------------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoder_context_length(model) -> int | None:
    """The decoder's position limit (``max_position_embeddings`` / ``n_positions``), if it states one."""
    return model.config.context_length()


def _check_length(model, sample: Sample, where: str) -> None:
    limit = decoder_context_length(model)
    if limit is not None:
        n = sample_length(sample, model.config)
        if n > limit:
            raise InputError(
                f"{where}: the prompt takes {n} decoder positions, more than the decoder's {limit}; "
                "use fewer shots or shorter inputs (a task's truncate_words)"
            )


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.decoder.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def score_samples(
    model, processor: MetaLMProcessor, samples: Sequence[Sample]
) -> list[tuple[float, int, bool]]:
    """One right-padded forward over ``samples``; per sample ``(sum log p, n scored tokens, greedy)``.

    The scored tokens are those with labels (``Target`` parts / ``TextSegment(loss=True)``); label at
    position p is predicted by the logits at p - 1. Only the logit rows needed are computed when the
    decoder supports ``logits_to_keep`` (large vocabularies)."""
    batch = to_device(processor.collate(list(samples), padding_side="right"), _device(model))
    labels = batch.pop("labels")
    target = labels[:, 1:] != -100
    rows, cols = target.nonzero(as_tuple=True)  # cols = predicting position p - 1
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model) and len(cols):
        keep = torch.unique(cols)
        kwargs["logits_to_keep"] = keep
        index = torch.full((labels.shape[1],), -1, dtype=torch.long, device=labels.device)
        index[keep] = torch.arange(len(keep), device=labels.device)
        pos = index[cols]
    else:
        pos = cols
    logits = model(**batch, **kwargs).logits
    picked = logits[rows, pos].float().log_softmax(-1)
    gold = labels[:, 1:][rows, cols]
    token_lp = picked.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    greedy_tok = picked.argmax(-1) == gold
    n = len(samples)
    sums = torch.zeros(n, dtype=torch.float64, device=token_lp.device).index_add_(0, rows, token_lp.double())
    counts = torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    misses = torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, (~greedy_tok).long())
    return [
        (float(s), int(c), bool(m == 0)) for s, c, m in zip(sums.tolist(), counts.tolist(), misses.tolist())
    ]


def _cut(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
    return text


@torch.inference_mode()
def generate_samples(
    model,
    processor: MetaLMProcessor,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    strip: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded, cut at the first stop string and (``strip``)
    stripped. Generation ends at the decoder's EOS token (the default demonstration separator)."""
    batch = to_device(processor.collate(list(samples), padding_side="left"), _device(model))
    batch.pop("labels")
    kwargs = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    pieces = continuation_pieces(processor.tokenizer)
    if pieces:  # every generation here starts a new word (after encoded slots, a prompt or a cue)
        kwargs.setdefault("begin_suppress_tokens", pieces)
    if processor.eos_token_id is not None:
        kwargs.setdefault("eos_token_id", processor.eos_token_id)
    kwargs.setdefault("pad_token_id", processor.pad_token_id)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    texts = []
    for row in new.tolist():
        if processor.eos_token_id is not None and processor.eos_token_id in row:
            row = row[: row.index(processor.eos_token_id)]
        text = _cut(processor.decode(row), stop)
        texts.append(text.strip() if strip else text)
    return texts


# ---------------------------------------------------------------------------------------------------------
# One (task, k, seed) run
# ---------------------------------------------------------------------------------------------------------
def subset_examples(examples: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` examples of a fixed shuffle (built-in splits can be sorted by label, so a plain
    head would be one class); the same subset for every k and seed."""
    if limit is None or limit >= len(examples):
        return examples
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    picked = sorted(random.Random(SUBSET_SEED).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _gold(ex: Example) -> str | list[str]:
    return ex.answers[0] if len(ex.answers) == 1 else list(ex.answers)


def _warn_if_images_left_out(model, task: Task, examples: list[Example]) -> None:
    """A model without a vision encoder reads the text only (as it was trained): say so, once per task."""
    has_vision = hasattr(model.config, "encoders_of_kind") and bool(model.config.encoders_of_kind("vision"))
    with_images = sum(ex.image is not None for ex in examples)
    if with_images and not has_vision:
        logger.warning(
            "task %r: the model has no vision encoder, so the images of %d of %d examples are left out "
            "(it reads the text only, as it was trained)", task.name, with_images, len(examples),
        )  # fmt: skip


def _run(
    model,
    processor: MetaLMProcessor,
    task: Task,
    examples: list[Example],
    pool: list[Example],
    *,
    k: int,
    seed: int,
    baseline: bool,
    separator: str | None,
    batch_size: int,
    progress: bool,
) -> tuple[list[dict[str, Any]], list[Example]]:
    """Per-example records (id, prompt, prediction, gold, score, ...) for one (task, k, seed), and the
    queries as asked (an episode task renames their answers)."""
    fits = None if baseline else encoder_fits(processor)
    images = (
        bool(model.config.encoders_of_kind("vision")) if hasattr(model.config, "encoders_of_kind") else False
    )
    same_pool = task.demo_split is None or task.demo_split == task.eval_split
    if task.episodes is not None:
        episodes = [task.episodes(ex, pool, k, seed, i) for i, ex in enumerate(examples)]
    else:
        episodes = [
            (sample_demonstrations(pool, k, seed=seed, index=i, exclude_id=ex.id if same_pool else None), ex)
            for i, ex in enumerate(examples)
        ]
    queries = [query for _, query in episodes]

    def prompt(i: int, ex: Example) -> tuple[list[Any], Sample]:
        parts = build_prompt(
            task, ex, episodes[i][0], baseline=baseline, separator=separator, fits=fits, images=images
        )
        return parts, prompt_to_sample(processor, parts, index=i)

    desc = f"{task.name} k={k} s={seed}"
    if task.scoring == "generate":
        bar = tqdm(total=len(queries), desc=desc, unit="ex", disable=not progress)
        stop = [*task.stop, *([separator] if separator else [])]
        return _generated_records(model, processor, task, queries, prompt, batch_size, stop, bar), queries
    bar = tqdm(
        total=sum(len(task.options_for(ex)) for ex in queries), desc=desc, unit="seq", disable=not progress
    )
    return _ranked_records(model, processor, task, queries, prompt, batch_size, bar), queries


def _generated_records(
    model, processor, task: Task, examples: list[Example], prompt, batch_size: int, stop: list[str], bar
) -> list[dict[str, Any]]:
    """Greedy generations, `batch_size` prompts at a time, scored against the gold answers."""
    records: list[dict[str, Any]] = []
    for chunk in _chunks(list(enumerate(examples)), batch_size):
        built = [prompt(i, ex) for i, ex in chunk]
        for (_, ex), (_, sample) in zip(chunk, built):
            _check_length(model, sample, f"task {task.name!r}, example {ex.id!r}")
        texts = generate_samples(
            model, processor, [s for _, s in built], max_new_tokens=task.max_new_tokens, stop=stop
        )
        for (_, ex), (parts, _), text in zip(chunk, built, texts):
            records.append(
                {
                    "id": ex.id,
                    "prompt": describe_prompt(parts),
                    "prediction": text,
                    "gold": _gold(ex),
                    "score": task.example_score(text, ex),
                }
            )
        bar.update(len(chunk))
    bar.close()
    return records


def _ranked_records(
    model, processor, task: Task, examples: list[Example], prompt, batch_size: int, bar
) -> list[dict[str, Any]]:
    """Each example's options ranked by their (summed or mean) log-likelihood after the prompt: the
    (example, option) pairs are flattened, one forward per `batch_size` sequences."""
    option_ids: dict[str, list[int]] = {}

    def ids_of(option: str) -> list[int]:
        if option not in option_ids:
            option_ids[option] = processor.tokenize(task.render_target(option))
            if not option_ids[option]:
                raise TaskError(f"task {task.name!r}: option {option!r} tokenizes to nothing")
        return option_ids[option]

    scores: dict[int, list[tuple[float, int, bool]]] = {}
    prompts: dict[int, str] = {}
    pending: list[tuple[int, Sample]] = []

    def flush() -> None:
        for (i, _), result in zip(pending, score_samples(model, processor, [s for _, s in pending])):
            scores.setdefault(i, []).append(result)
        bar.update(len(pending))
        pending.clear()

    for i, ex in enumerate(examples):
        parts, sample = prompt(i, ex)
        prompts[i] = describe_prompt(parts)
        for option in task.options_for(ex):
            full = [*sample, TextSegment(ids_of(option), loss=True)]
            _check_length(model, full, f"task {task.name!r}, example {ex.id!r}")
            pending.append((i, full))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    bar.close()
    return [_ranked_record(task, ex, prompts[i], scores[i]) for i, ex in enumerate(examples)]


def _ranked_record(
    task: Task, ex: Example, prompt: str, scores: list[tuple[float, int, bool]]
) -> dict[str, Any]:
    options = task.options_for(ex)
    values = [s / c if task.normalization == "mean" else s for s, c, _ in scores]
    best = max(range(len(options)), key=values.__getitem__)
    return {
        "id": ex.id,
        "prompt": prompt,
        "prediction": options[best],
        "gold": _gold(ex),
        "score": task.example_score(options[best], ex),
        "option_scores": {o: round(v, 6) for o, v in zip(options, values)},
    }


# ---------------------------------------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------------------------------------
def _aggregate(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k, v in next(iter(per_seed.values())).items() if isinstance(v, int | float) and k != "n"]
    mean, std = {}, {}
    for key in keys:
        values = [float(m[key]) for m in per_seed.values()]
        mean[key] = statistics.fmean(values)
        std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


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
    return "\n".join(lines + group_markdown(summary)) + "\n"


def _checked_runs(shots: Sequence[int], seeds: Sequence[int], batch_size: int) -> tuple[list[int], list[int]]:
    shots, seeds = [int(k) for k in shots], [int(s) for s in seeds]
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"shots must be non-negative integers, got {shots}")
    if not seeds:
        raise ValueError("need at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return shots, seeds


def _evaluate_task(
    model,
    processor,
    t: Task,
    shots: list[int],
    seeds: list[int],
    *,
    limit: int | None,
    out: Path | None,
    **run,
) -> dict[str, Any]:
    """One task's results by k (the `results` entry of the summary); prediction files go to `out`."""
    examples = subset_examples(t.examples(t.eval_split), limit)
    _warn_if_images_left_out(model, t, examples)
    pool: list[Example] = []
    if any(k > 0 for k in shots) or t.episodes is not None:  # zero-shot runs never touch demonstrations
        pool = t.examples(t.demo_split) if t.demo_split else t.examples(t.eval_split)
    by_k: dict[str, Any] = {}
    for k in shots:
        per_seed: dict[int, dict[str, Any]] = {}
        records_by_seed: dict[int, list[dict[str, Any]]] = {}
        for seed in seeds if k > 0 or t.episodes is not None else seeds[:1]:
            records, queries = _run(model, processor, t, examples, pool, k=k, seed=seed, **run)
            for r, ex in zip(records, queries):
                if ex.group is not None:
                    r["group"] = ex.group
            records_by_seed[seed] = records
            per_seed[seed] = t.compute_metrics([r["prediction"] for r in records], queries)
            if out is not None:
                with open(out / f"predictions-{t.name}-k{k}-s{seed}.jsonl", "w", encoding="utf-8") as fh:
                    for r in records:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        mean, std = _aggregate(per_seed)
        by_k[str(k)] = {
            "n": len(examples),
            "seeds": {str(s): m for s, m in per_seed.items()},
            "mean": mean,
            "std": std,
        }
        groups = group_scores(t, examples, records_by_seed)
        if groups:
            by_k[str(k)]["groups"] = groups
    return by_k


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
) -> dict[str, Any]:
    """Evaluate ``model`` on one or more tasks for every k in ``shots`` and every seed.

    ``task``: a :class:`Task`, a built-in name (``easyvqa``, ``easyvqa-caption``, ``bbc-topic``) or a task
    file path, or a list of them. ``baseline=None`` picks baseline mode (inputs as decoder text) for a model
    without a text encoder; ``separator=None`` separates demonstrations with the decoder's EOS token;
    ``normalization`` overrides every rank task's ``sum`` / ``mean``. k = 0 runs once (with the first seed).

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
        "protocols": {t.name: t.settings() for t in tasks},
        "results": {},
    }
    try:
        for t in tasks:
            summary["results"][t.name] = _evaluate_task(
                model, processor, t, shots, seeds, limit=limit, out=out, baseline=baseline,
                separator=separator, batch_size=batch_size, progress=progress,
            )  # fmt: skip
    finally:
        model.train(was_training)
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        (out / "results.md").write_text(_results_markdown(summary))
    return summary


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
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
) -> dict[str, Any]:
    """``metalm eval MODEL --task NAME [--task ...] [--shots 0,1,4] [--seeds 0,1,2] [--limit N] [--out DIR]``.

    Loads a saved MetaLM (folder from ``save_pretrained``) with its processor, evaluates, writes the
    outputs to ``out`` and prints ``results.md``. ``data``: records files evaluated in the model's trained
    layouts, grouped by ``meta.<group_by>`` (:mod:`metalm.evaluation.own_data`)."""
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
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = AutoModelForCausalLM.from_pretrained(model).to(dev)
    processor = MetaLMProcessor.from_pretrained(model)
    for path, by_kind in own:
        tasks += data_tasks(path, by_kind, layouts_of(lm.config))
    summary = evaluate(
        lm, processor, tasks, shots=shot_list, seeds=seed_list, limit=limit, batch_size=batch_size,
        out_dir=out, baseline=baseline, separator=separator, normalization=normalization, model_name=model,
    )  # fmt: skip
    print((Path(out) / "results.md").read_text(), end="")
    return summary


def _eval_from_args(args: argparse.Namespace) -> int:
    eval_main(
        args.model, args.task or [], shots=args.shots, seeds=args.seeds, limit=args.limit, out=args.out,
        batch_size=args.batch_size, baseline=args.baseline, separator=args.separator,
        normalization=args.normalization, device=args.device, data=args.data or (), group_by=args.group_by,
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
        "--group-by", default="type", metavar="KEY",
        help="with --data: score per value of the records' meta.KEY, beside each group's majority answer",
    )  # fmt: skip
    p.add_argument("--shots", default="0", help="comma-separated demonstration counts, e.g. 0,1,4")
    p.add_argument(
        "--seeds", default="0", help="comma-separated seeds for demonstration sampling, e.g. 0,1,2"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate a fixed random subset of N examples")
    p.add_argument("--out", default="eval-results", help="output folder")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=None,
        help="inputs as plain decoder text (GPT baseline); default: only for models without a text encoder",
    )  # fmt: skip
    p.add_argument("--separator", default=None, help="demonstration separator text (default: the EOS token)")
    p.add_argument("--normalization", choices=("sum", "mean"), default=None, help="override option scoring")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_eval_from_args)
    return p

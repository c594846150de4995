"""One task's runs: for every k and seed, each evaluated example's prompt (k sampled demonstrations,
:mod:`metalm.evaluation.icl`), scored by generation or by ranking its options, and the metrics per seed with
their mean and spread (:func:`evaluate_task`); prediction files when asked."""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metalm.data.processor import MetaLMProcessor
from metalm.data.segments import Sample, TextSegment
from metalm.evaluation.demonstrations import calibrated_choice, content_free, copying_rates, shared_fields
from metalm.evaluation.icl import (
    build_prompt,
    describe_prompt,
    encoder_fits,
    has_text_encoder,
    input_parts,
    prompt_to_sample,
    sample_demonstrations,
)
from metalm.evaluation.own_data import group_scores
from metalm.evaluation.prediction_files import prediction_path
from metalm.evaluation.retrieval import ExampleIndex
from metalm.evaluation.scoring import check_length, generate_samples, score_continuations
from metalm.evaluation.tasks import Example, Task, TaskError
from metalm.modalities import encoders_of_field

__all__ = ["SUBSET_SEED", "evaluate_task", "subset_examples"]

SUBSET_SEED = "metalm-eval-subset"
logger = logging.getLogger("metalm.evaluation")


def subset_examples(
    examples: list[Example], limit: int | None, per_group: int | None = None
) -> list[Example]:
    """The first ``limit`` examples of a fixed shuffle (built-in splits can be sorted by label, so a plain
    head would be one class); the same subset for every k and seed. ``per_group``: at most that many of each
    group (:attr:`Example.group`), the first of a fixed shuffle of the whole split, so that a rare group (easy-VQA's colour
    questions, an eighth of the split) is measured on as many examples as a common one; ``limit`` then caps
    the total. Kept in the split's order."""
    for name, value in (("limit", limit), ("per_group", per_group)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if per_group is not None:
        taken: Counter[str | None] = Counter()
        kept = []
        for i in random.Random(SUBSET_SEED).sample(range(len(examples)), len(examples)):
            if taken[examples[i].group] < per_group:
                taken[examples[i].group] += 1
                kept.append(i)
        return [examples[i] for i in sorted(kept[:limit])]
    if limit is None or limit >= len(examples):
        return examples
    picked = sorted(random.Random(SUBSET_SEED).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _gold(ex: Example) -> str | list[str]:
    return ex.answers[0] if len(ex.answers) == 1 else list(ex.answers)


def _warn_if_images_left_out(model, task: Task, examples: list[Example]) -> None:
    """A model without a vision encoder reads the text only (as it was trained): say so, once per task."""
    has_vision = bool(encoders_of_field(model.config, "image"))
    with_images = sum(ex.image is not None for ex in examples)
    if with_images and not has_vision:
        logger.warning(
            "task %r: the model has no vision encoder, so the images of %d of %d examples are left out "
            "(it reads the text only, as it was trained)", task.name, with_images, len(examples),
        )  # fmt: skip


def _run_once(
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
    calibrate: bool = False,
    retrieval: ExampleIndex | None = None,
) -> tuple[list[dict[str, Any]], list[Example]]:
    """Per-example records (id, prompt, prediction, gold, score, the demonstrations' answers, ...) for one
    (task, k, seed), and the queries as asked (an episode task renames their answers). ``calibrate``: a
    ranked task's choice is calibrated against a content-free query (:mod:`~metalm.evaluation.demonstrations`);
    ``retrieval``: each query's demonstrations are the pool examples most similar to it
    (:mod:`~metalm.evaluation.retrieval`) instead of a random draw."""
    fits = None if baseline else encoder_fits(processor)
    images = bool(encoders_of_field(model.config, "image"))
    same_pool = task.demo_split is None or task.demo_split == task.eval_split
    if task.episodes is not None:
        episodes = [task.episodes(ex, pool, k, seed, i) for i, ex in enumerate(examples)]
    elif retrieval is not None:
        episodes = list(zip(retrieval.demonstrations(pool, examples, k, exclude_self=same_pool), examples))
    else:
        episodes = [
            (sample_demonstrations(pool, k, seed=seed, index=i, exclude_id=ex.id if same_pool else None), ex)
            for i, ex in enumerate(examples)
        ]
    queries = [query for _, query in episodes]

    def built(demos: Sequence[Example], query: Example, i: int) -> tuple[list[Any], Sample]:
        parts = build_prompt(
            task, query, demos, baseline=baseline, separator=separator, fits=fits, images=images
        )
        return parts, prompt_to_sample(processor, parts, index=i)

    def prompt(i: int, ex: Example) -> tuple[list[Any], Sample]:
        return built(episodes[i][0], ex, i)

    desc = f"{task.name} k={k} s={seed}"
    if task.scoring == "generate":
        bar = tqdm(total=len(queries), desc=desc, unit="ex", disable=not progress)
        stop = [*task.stop, *([separator] if separator else [])]
        records = _generated_records(model, processor, task, queries, prompt, batch_size, stop, bar)
    else:
        references = _content_free_references(task, episodes) if calibrate else {}
        sequences = sum(len(task.options_for(ex)) for ex in queries) + sum(
            len(task.options_for(query)) for _, query in references.values()
        )
        bar = tqdm(total=sequences, desc=desc, unit="seq", disable=not progress)

        def reference(i: int) -> tuple[Any, Callable[[], Sample]] | None:
            """Example i's content-free prompt: its key, and how to build it (once per key)."""
            if not calibrate:
                return None
            key = _reference_key(task, *episodes[i])
            return key, lambda: built(*references[key], i)[1]

        records = _ranked_records(model, processor, task, queries, prompt, batch_size, bar, reference)
    for record, (demos, _) in zip(records, episodes):
        if demos:
            record["demonstration_answers"] = [task.label(d) for d in demos]
    return records, queries


def _retrieval(model, processor: MetaLMProcessor, task: Task, run: dict[str, Any]) -> ExampleIndex:
    """The similarity index of ``task``'s pool, its examples read as the task shows them, text through the
    model's text encoder whenever it has one (in baseline mode too, so that both modes get the same
    demonstrations); a model without one compares decoder token embeddings."""
    baseline = not has_text_encoder(model)
    fits = None if baseline else encoder_fits(processor)
    images = bool(encoders_of_field(model.config, "image"))

    def parts_of(ex: Example) -> list[Any]:
        return input_parts(task, ex, baseline=baseline, fewshot=True, fits=fits, images=images)

    return ExampleIndex(model, processor, task, parts_of, progress=run.get("progress", True))


def _reference_key(task: Task, demos: Sequence[Example], query: Example) -> tuple[Any, ...]:
    """Calibration's reference prompt is shared by the queries with the same demonstrations and options
    (at k = 0, by all of them)."""
    return tuple(d.id for d in demos), tuple(d.answers for d in demos), task.options_for(query)


def _content_free_references(
    task: Task, episodes: Sequence[tuple[list[Example], Example]]
) -> dict[tuple[Any, ...], tuple[list[Example], Example]]:
    keep = shared_fields([query for _, query in episodes])
    return {
        _reference_key(task, demos, query): (demos, content_free(query, keep)) for demos, query in episodes
    }


def _generated_records(
    model, processor, task: Task, examples: list[Example], prompt, batch_size: int, stop: list[str], bar
) -> list[dict[str, Any]]:
    """Greedy generations, `batch_size` prompts at a time, scored against the gold answers."""
    records: list[dict[str, Any]] = []
    for chunk in _chunks(list(enumerate(examples)), batch_size):
        built = [prompt(i, ex) for i, ex in chunk]
        for (_, ex), (_, sample) in zip(chunk, built):
            check_length(model, sample, f"task {task.name!r}, example {ex.id!r}")
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
    model, processor, task: Task, examples: list[Example], prompt, batch_size: int, bar, reference
) -> list[dict[str, Any]]:
    """Each example's options ranked by their (summed or mean) log-likelihood after the prompt: `batch_size`
    prompts per forward, each run once and its options read from its KV cache (``score_continuations``).
    ``reference(i)``: None, or the key of example i's content-free prompt and how to build it; its option
    scores calibrate the choice (built and scored once per key)."""
    option_ids: dict[str, list[int]] = {}

    def ids_of(option: str) -> list[int]:
        if option not in option_ids:
            option_ids[option] = processor.tokenize(task.render_target(option))
            if not option_ids[option]:
                raise TaskError(f"task {task.name!r}: option {option!r} tokenizes to nothing")
        return option_ids[option]

    scores: dict[Any, list[tuple[float, int, bool]]] = {}
    prompts: dict[int, str] = {}
    pending: dict[Any, tuple[Sample, list[list[int]]]] = {}
    references: dict[int, Any] = {}

    def flush() -> None:
        samples, options = zip(*pending.values())
        scores.update(zip(pending, score_continuations(model, processor, list(samples), list(options))))
        bar.update(sum(map(len, options)))
        pending.clear()

    def queue(key: Any, sample: Sample, ex: Example) -> None:
        ids = [ids_of(option) for option in task.options_for(ex)]
        check_length(model, [*sample, TextSegment(max(ids, key=len), loss=True)], f"task {task.name!r}, example {ex.id!r}")  # fmt: skip
        pending[key] = (sample, ids)
        if len(pending) >= batch_size:
            flush()

    for i, ex in enumerate(examples):
        parts, sample = prompt(i, ex)
        prompts[i] = describe_prompt(parts)
        queue(i, sample, ex)
        ref = reference(i)
        if ref is not None:
            references[i] = ("content-free", ref[0])
            if references[i] not in scores and references[i] not in pending:
                queue(references[i], ref[1](), ex)
    if pending:
        flush()
    bar.close()
    return [
        _ranked_record(task, ex, prompts[i], scores[i], scores.get(references.get(i)))
        for i, ex in enumerate(examples)
    ]


def _ranked_record(
    task: Task,
    ex: Example,
    prompt: str,
    scores: list[tuple[float, int, bool]],
    content_free_scores: list[tuple[float, int, bool]] | None = None,
) -> dict[str, Any]:
    options = task.options_for(ex)

    def values(scored: list[tuple[float, int, bool]]) -> list[float]:
        return [s / c if task.normalization == "mean" else s for s, c, _ in scored]

    def by_option(numbers: list[float]) -> dict[str, float]:
        return {o: round(v, 6) for o, v in zip(options, numbers)}

    raw = values(scores)
    record: dict[str, Any] = {"id": ex.id, "prompt": prompt}
    if content_free_scores is None:
        best = max(range(len(options)), key=raw.__getitem__)
    else:
        free = values(content_free_scores)
        best, calibrated = calibrated_choice(raw, free)
        record["calibrated_scores"], record["content_free_scores"] = by_option(calibrated), by_option(free)
    return {
        **record,
        "prediction": options[best],
        "gold": _gold(ex),
        "score": task.example_score(options[best], ex),
        "option_scores": by_option(raw),
    }


def _aggregate(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k, v in next(iter(per_seed.values())).items() if isinstance(v, int | float) and k != "n"]
    mean, std = {}, {}
    for key in keys:
        values = [float(m[key]) for m in per_seed.values()]
        mean[key] = statistics.fmean(values)
        std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def evaluate_task(
    model,
    processor,
    t: Task,
    shots: list[int],
    seeds: list[int],
    *,
    limit: int | None,
    out: Path | None,
    per_group: int | None = None,
    similar: bool = False,
    **run,
) -> dict[str, Any]:
    """One task's results by k (the `results` entry of the summary); prediction files go to `out`.
    ``similar``: demonstrations retrieved by similarity (once per k: retrieval does not depend on the seed)."""
    examples = subset_examples(t.examples(t.eval_split), limit, per_group)
    _warn_if_images_left_out(model, t, examples)
    pool: list[Example] = []
    if any(k > 0 for k in shots) or t.episodes is not None:  # zero-shot runs never touch demonstrations
        pool = t.examples(t.demo_split) if t.demo_split else t.examples(t.eval_split)
    retrieval = _retrieval(model, processor, t, run) if similar and t.episodes is None else None
    by_k: dict[str, Any] = {}
    for k in shots:
        per_seed: dict[int, dict[str, Any]] = {}
        records_by_seed: dict[int, list[dict[str, Any]]] = {}
        draws = (k > 0 and retrieval is None) or t.episodes is not None  # else one run serves every seed
        for seed in seeds if draws else seeds[:1]:
            records, queries = _run_once(
                model, processor, t, examples, pool, k=k, seed=seed, retrieval=retrieval, **run
            )
            for r, ex in zip(records, queries):
                if ex.group is not None:
                    r["group"] = ex.group
            records_by_seed[seed] = records
            per_seed[seed] = t.compute_metrics([r["prediction"] for r in records], queries)
            if out is not None:
                with open(prediction_path(out, t.name, k, seed), "w", encoding="utf-8") as fh:
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
        copying = [rates for rates in map(copying_rates, records_by_seed.values()) if rates is not None]
        if copying:  # averaged over seeds, like the metrics
            by_k[str(k)]["copying"] = {key: statistics.fmean(r[key] for r in copying) for key in copying[0]}
    return by_k

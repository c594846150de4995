"""Do demonstrations help once the labels they show stop winning for that reason, and when they are chosen
like the query? Writes docs/demonstrations.md.

Each saved model is evaluated on BBC topics in context (five topics ranked after ``topic:``, the articles
and their demonstrations through the text encoder) at ``--shots`` over ``--seeds``, twice on the very same
prompts: options ranked by their log-likelihood (the paper's protocol), and ranked after contextual
calibration (``metalm eval --calibrate``: each option's probability divided by its probability after the
same demonstrations and a content-free query, N/A). The page gives, per model and k, both accuracies, the
paired change article by article with its 95 % interval, how often the answer is one of the
demonstrations' topics beside how often the gold one is (copying), and per topic how often it is answered
and how often it is right (a calibration that only moved every answer to one topic would show there).
``--plain`` also evaluates every model with the articles and demonstrations as plain decoder text (the
paper's GPT-baseline input), and compares the encoder with it, calibrated, against the bar of
docs/results.md (through the encoder at least the plain-text score minus 5). ``--similar`` also evaluates
both modes (and, with ``--plain``, as plain text) with each article's demonstrations retrieved as the
training articles most like it under the model's encoders (``metalm eval --demos similar``), against the
random draws.

    python scripts/demonstration_results.py --model stage-1=runs/gemma-vl-yes-no/final \\
        --model icl=runs/gemma-vl-icl-yn/final --out runs/calibration --page docs/demonstrations.md --plain --similar

Every number on the page comes from the prediction files under ``--out`` (reused when they exist for the
same shots, seeds, limit, calibration and choice of demonstrations).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.breakdown import paired_change
from metalm.evaluation.demonstrations import copying_rates, demonstration_vote
from metalm.evaluation.experiments import cached_eval, load_model
from metalm.evaluation.prediction_files import prediction_path, read_predictions

TASK = "bbc-topic"
MODES = {"ranked": False, "calibrated": True}


def _folder(out: Path, name: str, mode: str, plain: bool = False, similar: bool = False) -> Path:
    """Where one model's run of one mode is cached: ``<name>/[plain-][similar-]<mode>`` (``plain``: as plain
    text; ``similar``: demonstrations retrieved by similarity)."""
    return out / name / ("plain-" * plain + "similar-" * similar + mode)


def evaluate_models(models: dict[str, Path], args: argparse.Namespace) -> None:
    """Both modes for every model (with ``--plain`` as plain text too, with ``--similar`` with retrieved
    demonstrations too: as plain text ranked only), cached under ``--out``."""
    for name, folder in models.items():
        model, processor = load_model(folder)
        for similar in (False, True) if args.similar else (False,):
            for plain in (False, True) if args.plain else (False,):
                for mode, calibrate in MODES.items():
                    if similar and plain and calibrate:  # the page compares retrieved ones ranked only
                        continue
                    kw = {
                        "limit": args.limit,
                        "batch_size": args.batch_size,
                        "progress": True,
                        "calibrate": calibrate,
                        "demonstrations": "similar" if similar else "random",
                    }
                    where = _folder(args.out, name, mode, plain, similar)
                    cached_eval(where, model, processor, TASK, args.shots, args.seeds, baseline=plain, **kw)


def runs(folder: Path, k: int, seeds: Sequence[int], once: bool = False) -> list[list[dict[str, Any]]]:
    """Each seed's prediction records (k = 0 runs once; so does every k when ``once``: retrieved
    demonstrations do not depend on the seed)."""
    return [
        read_predictions(prediction_path(folder, TASK, k, s))
        for s in (seeds if k and not once else seeds[:1])
    ]


def _per_article(seed_runs: list[list[dict[str, Any]]]) -> list[float]:
    return [statistics.fmean(float(r["score"]) for r in rows) for rows in zip(*seed_runs)]


def _mean_std(seed_runs: list[list[dict[str, Any]]]) -> str:
    accs = [100 * statistics.fmean(float(r["score"]) for r in rows) for rows in seed_runs]
    return f"{statistics.fmean(accs):.1f}" + (f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else "")


def _copying(seed_runs: list[list[dict[str, Any]]], key: str) -> float:
    """``copying_rates``' ``prediction_`` or ``gold_among_demonstrations`` over every seed's records."""
    return copying_rates([r for rows in seed_runs for r in rows])[f"{key}_among_demonstrations"]


def _change(before: list[list[dict[str, Any]]], after: list[list[dict[str, Any]]]) -> str:
    change = paired_change(_per_article(before), _per_article(after))
    return f"{change['mean']:+.1f} ± {change['ci95']:.1f}"


def accuracy_rows(name: str, out: Path, shots: Sequence[int], seeds: Sequence[int]) -> list[str]:
    """One row per k: ranked, calibrated, calibrated against ranked and against calibrated k = 0 (article
    by article), and copying in both modes."""
    rows = []
    zero = runs(_folder(out, name, "calibrated"), 0, seeds) if 0 in shots else None
    for k in shots:
        ranked, calibrated = (runs(_folder(out, name, mode), k, seeds) for mode in MODES)
        copy = "—" if not k else (
            f"{_copying(ranked, 'prediction'):.1f} / {_copying(calibrated, 'prediction'):.1f} "
            f"({_copying(ranked, 'gold'):.1f})"
        )  # fmt: skip
        from_zero = _change(zero, calibrated) if k and zero is not None else "—"
        rows.append(
            f"| {name} | {k} | {_mean_std(ranked)} | {_mean_std(calibrated)} | {_change(ranked, calibrated)} | "
            f"{from_zero} | {copy} |"
        )
    return rows


def plain_rows(name: str, out: Path, shots: Sequence[int], seeds: Sequence[int]) -> list[str]:
    """One row per k: through the encoder and as plain text, ranked and calibrated, and the calibrated
    encoder - plain change article by article against the bar (the encoder at most 5 points below)."""
    rows = []
    for k in shots:
        encoded = {mode: runs(_folder(out, name, mode), k, seeds) for mode in MODES}
        plain = {mode: runs(_folder(out, name, mode, plain=True), k, seeds) for mode in MODES}
        change = paired_change(_per_article(plain["calibrated"]), _per_article(encoded["calibrated"]))
        verdict = "met" if change["mean"] >= -5 else "not met"
        cells = " | ".join(f"{_mean_std(encoded[m])} | {_mean_std(plain[m])}" for m in MODES)
        rows.append(f"| {name} | {k} | {cells} | {change['mean']:+.1f} ± {change['ci95']:.1f} | {verdict} |")
    return rows


def similar_rows(name: str, out: Path, shots: Sequence[int], seeds: Sequence[int], plain: bool) -> list[str]:
    """One row per k > 0: random and retrieved demonstrations, ranked and calibrated, the paired change
    (each article's random score averaged over the seeds), the copy rates, and with ``plain`` the ranked
    encoder - plain change against the bar."""
    rows = []
    for k in (k for k in shots if k):
        drawn = {mode: runs(_folder(out, name, mode), k, seeds) for mode in MODES}
        near = {mode: runs(_folder(out, name, mode, similar=True), k, seeds, once=True) for mode in MODES}
        cells = [
            *(f"{_mean_std(drawn[m])} | {_mean_std(near[m])} | {_change(drawn[m], near[m])}" for m in MODES),
            f"{_copying(near['ranked'], 'prediction'):.1f} ({_copying(near['ranked'], 'gold'):.1f})",
            f"{_vote_accuracy(near['ranked']):.1f}",
        ]
        if plain:
            text = runs(_folder(out, name, "ranked", plain=True, similar=True), k, seeds, once=True)
            change = paired_change(_per_article(text), _per_article(near["ranked"]))
            verdict = "met" if change["mean"] >= -5 else "not met"
            cells.append(f"{_mean_std(text)} | {change['mean']:+.1f} ± {change['ci95']:.1f} ({verdict})")
        rows.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    return rows


def _vote_accuracy(seed_runs: list[list[dict[str, Any]]]) -> float:
    """``demonstration_vote`` over every seed's records: what a nearest-neighbour vote of the retrieved
    topics scores with no language model at all."""
    return demonstration_vote([r for rows in seed_runs for r in rows]) or 0.0


def similar_section(models: dict[str, Path], args: argparse.Namespace) -> list[str]:
    plain_head = " ranked, as plain text | encoder − plain, ranked (≥ −5: the bar) |" if args.plain else ""
    return [
        "## Demonstrations chosen like the query",
        "",
        "The same articles with each one's k demonstrations retrieved instead of drawn (`metalm eval --demos "
        "similar`: the training articles whose encoder vectors are closest to the article's, most similar next "
        "to it; RICES in Flamingo, KATE for GPT-3). Retrieval does not depend on the seed, so it runs once a k; "
        "its change is paired with each article's random score averaged over the seeds. The copy column: how "
        "often the ranked answer is one of the retrieved demonstrations' topics (how often the gold is); the vote "
        "column: how often the topic most of them show (ties: the most similar one's) is the gold, what a "
        "nearest-neighbour vote scores with no language model at all."
        + (
            " As plain text, the demonstrations are the same articles (retrieval reads them through the text "
            "encoder in both modes)."
            if args.plain
            else ""
        ),
        "",
        "| model | k | ranked: random | ranked: similar | similar − random | calibrated: random | calibrated: "
        "similar | similar − random | answer is a demonstration's topic (gold is) | vote |" + plain_head,
        "|---|---:|---:|---:|---|---:|---:|---|---|---:|" + ("---:|---|" if args.plain else ""),
        *[row for name in models for row in similar_rows(name, args.out, args.shots, args.seeds, args.plain)],
        "",
    ]


def topic_rows(name: str, out: Path, k: int, seeds: Sequence[int]) -> list[str]:
    """Per gold topic at ``k``: its articles, how often it is answered and how often it is right, both modes."""
    by_mode = {mode: [r for rows in runs(_folder(out, name, mode), k, seeds) for r in rows] for mode in MODES}
    topics = sorted({r["gold"] for r in by_mode["ranked"]})
    rows = []
    for topic in topics:
        cells = []
        for records in by_mode.values():
            answered = Counter(r["prediction"] for r in records)[topic]
            of_topic = [r for r in records if r["gold"] == topic]
            right = sum(r["score"] for r in of_topic)
            cells.append(f"{100 * answered / len(records):.1f} | {100 * right / len(of_topic):.1f}")
        share = 100 * len([r for r in by_mode["ranked"] if r["gold"] == topic]) / len(by_mode["ranked"])
        rows.append(f"| {name} | {k} | {topic} | {share:.1f} | " + " | ".join(cells) + " |")
    return rows


def plain_section(models: dict[str, Path], args: argparse.Namespace) -> list[str]:
    return [
        "Through the encoder against as plain text (`--baseline`: the articles and demonstrations as decoder "
        "text, the same demonstrations): the bar asks that the encoder score at least the plain-text score "
        "minus 5; judged here on the calibrated scores, where neither is held at the copying floor.",
        "",
        "| model | k | ranked: encoder | ranked: plain | calibrated: encoder | calibrated: plain | encoder − plain, "
        "calibrated | encoder ≥ plain − 5 |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        *[row for name in models for row in plain_rows(name, args.out, args.shots, args.seeds)],
        "",
    ]


def page_text(models: dict[str, Path], about: dict[str, str], args: argparse.Namespace, command: str) -> str:
    shots, seeds = args.shots, args.seeds
    lines = [
        "# Demonstrations that help: calibrated, and chosen like the query",
        "",
        f"Written by `scripts/demonstration_results.py` from its own outputs (`{command}`, on this 2-core CPU "
        f"machine). BBC topics in context, {args.limit} test articles (a fixed random subset), demonstrations "
        f"drawn from the training split per article and seed (seeds {', '.join(map(str, seeds))}; k = 0 runs "
        "once); the articles and the demonstrations through the text encoder. **ranked**: the five topics "
        "ranked by their log-likelihood after `topic:` (the paper's protocol, `metalm eval`); **calibrated**: "
        "the same prompts, each topic's probability divided by its probability after the same demonstrations "
        'and a content-free article, `N/A` (`metalm eval --calibrate`; Zhao et al. 2021, "Calibrate Before '
        'Use"). Scores x100.',
        "",
        "Models: "
        + "; ".join(f"**{n}** = `{p}`" + (f" ({about[n]})" if n in about else "") for n, p in models.items())
        + ".",
        "",
        "Changes are paired article by article (each article's score averaged over the seeds), ± the half-width "
        "of their 95 % interval.",
        "",
        "| model | k | ranked | calibrated | calibrated − ranked | calibrated, change from k = 0 | answer is a "
        "demonstration's topic: ranked / calibrated (gold is) |",
        "|---|---:|---:|---:|---|---|---|",
        *[row for name in models for row in accuracy_rows(name, args.out, shots, seeds)],
        "",
        *(plain_section(models, args) if args.plain else []),
        "Per topic (all seeds pooled): the share of articles of the topic, then for each mode how often the topic "
        "is answered and how often an article of it is answered right.",
        "",
        "| model | k | topic | articles | ranked: answered | ranked: right | calibrated: answered | calibrated: right |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        *[row for name in models for k in shots for row in topic_rows(name, args.out, k, seeds)],
        "",
        *(similar_section(models, args) if args.similar else []),
        "## What this shows and what it does not",
        "",
        "- It shows whether each model's demonstrations carry the task once the bias toward the labels they "
        "show is divided out: a k > 0 calibrated score above the k = 0 one is in-context learning; the copy "
        "columns say how much of the ranked score's fall is the demonstrations' labels winning.",
        "- It does not change the model, and it is not the paper's protocol: docs/results.md ranks without "
        "calibration. Calibration costs a second scoring of every prompt's options (one per distinct set of "
        "demonstrations) and applies to ranked tasks only; generated answers are unchanged.",
        "- Calibration divides out what the content-free prompt prefers; a topic the model's scores never favour "
        "for any article stays unanswered (the per-topic table shows which).",
        *(
            [
                "- Retrieved demonstrations show what a model does with demonstrations that resemble the query: "
                "whether it reads the answer off them (the copy column against the gold's). They are not the "
                "paper's protocol either (it draws at random), and their score depends on how often the most "
                "similar articles share the query's topic: that is what the gold column measures. A score at the vote "
                "column's is a model that reads the retrieved topics and nothing else; above it, the model also "
                "weighs them by the query. Calibrating retrieved demonstrations divides out what they are "
                "there for: the content-free reference is shown the same similar articles, so the topic they "
                "share is discounted as a prior.",
            ]
            if args.similar
            else []
        ),
        f"- The sample is small ({args.limit} articles): read the paired intervals, not single digits.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", action="append", required=True, metavar="NAME=FOLDER", help="a saved model; repeatable"
    )
    p.add_argument(
        "--about", action="append", default=[], metavar="NAME=TEXT", help="what model NAME is, for the page"
    )
    p.add_argument("--out", type=Path, default=Path("runs/calibration"))
    p.add_argument("--page", type=Path, default=Path("docs/demonstrations.md"))
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--plain", action="store_true", help="also evaluate with the inputs as plain decoder text")
    p.add_argument(
        "--similar", action="store_true", help="also evaluate with demonstrations retrieved by similarity"
    )
    p.add_argument("--shots", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 4])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            p.error(f"--model takes NAME=FOLDER, got {spec!r}")
        models[name] = Path(folder)
    about = dict(spec.partition("=")[::2] for spec in args.about)
    if set(about) - set(models):
        p.error(f"--about names {sorted(set(about) - set(models))}, which no --model names")
    evaluate_models(models, args)
    command = "python scripts/demonstration_results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.page.write_text(page_text(models, about, args, command))
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`metalm quickstart`: pre-train a small MetaLM on packaged data, then evaluate it on held-out data.

1. train `configs/quickstart.yaml` (a small decoder from config on MiniLM's WordPiece vocabulary, the packaged
   MiniLM text encoder and EfficientNet-Lite0 vision encoder, frozen and cached; semi-causal LM on BBC News
   documents, easy-VQA image–caption pairs, easy-VQA question–answer pairs, alone and as in-context rows);
2. evaluate the saved model on held-out easy-VQA **test** images (captioning with "Summarize this image:",
   open-ended VQA) and BBC News test articles (topic ranking), next to chance baselines computed on the
   same examples; then easy-VQA with 1 and 4 demonstrations and fast binding (made-up names only the
   demonstrations give; `metalm.evaluation.in_context`);
3. write `report.md` (with sample captions), `loss_curve.png`, metrics and predictions under the run folder.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).parent / "configs"


def preset_path(name: str) -> Path:
    """A preset shipped with metalm (`quickstart`, `paper-vl`, ...) or a YAML path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    packaged = PRESETS_DIR / f"{name}.yaml"
    if not packaged.exists():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset {name!r}; presets: {', '.join(names)} (or give a YAML path)")
    return packaged


def shown_preset(source: str) -> str:
    """A config path as a report names it: a packaged preset as ``configs/<name>.yaml`` (the repository's
    link to them), not the installed package's absolute path."""
    path = Path(source)
    return f"configs/{path.name}" if path.parent.resolve() == PRESETS_DIR.resolve() else source


def chance_baselines(eval_limit: int | None, seed: int = 0) -> dict[str, dict[str, float]]:
    """What guessing scores on the very examples the quickstart evaluates (same metrics, same subsets)."""
    from metalm.evaluation import metrics as M
    from metalm.evaluation.runner import subset_examples
    from metalm.evaluation.tasks import builtin_task

    rng = random.Random(seed)
    out: dict[str, dict[str, float]] = {}
    vqa = builtin_task("easyvqa")
    train_answers = Counter(a for ex in vqa.examples("train") for a in ex.answers[:1])
    majority = train_answers.most_common(1)[0][0]
    test = subset_examples(vqa.examples(vqa.eval_split), eval_limit)
    answers = list(train_answers)
    out["easyvqa"] = {
        "majority answer": 100 * sum(M.vqa_accuracy(majority, list(ex.answers)) for ex in test) / len(test),
        "random answer": 100
        * sum(M.vqa_accuracy(rng.choice(answers), list(ex.answers)) for ex in test)
        / len(test),
    }
    cap = builtin_task("easyvqa-caption")
    test = subset_examples(cap.examples(cap.eval_split), eval_limit)
    shuffled = [ex.answers[0] for ex in test]
    rng.shuffle(shuffled)
    scores = M.caption_scores(
        {ex.id: s for ex, s in zip(test, shuffled)}, {ex.id: list(ex.answers) for ex in test}
    )
    out["easyvqa-caption"] = {
        "CIDEr (another image's caption)": 100 * scores["CIDEr"],
        "BLEU-4 (another image's caption)": 100 * scores["BLEU-4"],
    }
    topic = builtin_task("bbc-topic")
    test = subset_examples(topic.examples(topic.eval_split), eval_limit)
    golds = [ex.answers[0] for ex in test]
    out["bbc-topic"] = {
        "majority topic": 100 * M.accuracy([Counter(golds).most_common(1)[0][0]] * len(golds), golds),
        "uniform": 100 / len(topic.options),
    }
    return out


# The quickstart's fast-binding rows (the results script adds colour, 2-way and 5-way).
QUICKSTART_FASTBIND = ("fastbind-shape-2way", "fastbind-shape-2way-real")

CAPTION_TASKS: dict[str, str] = {
    "easyvqa-caption-image": "image alone",
    "easyvqa-caption": '"Summarize this image:"',
}


def _predictions(eval_dir: Path, task: str) -> list[dict[str, Any]]:
    from metalm.evaluation.prediction_files import prediction_files, read_predictions

    files = prediction_files(eval_dir, task, 0)
    return read_predictions(files[0]) if files else []


def wording_prior_tables(vqa: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per question type, for these easy-VQA test predictions: what answering each question from its
    wording alone scores (the training split's most common answer for the wording, colour and shape words
    masked), and what the model scores on the questions that wording gets wrong."""
    from metalm.evaluation.breakdown import (
        vqa_against_wording_prior,
        wording_prior,
        wording_prior_by_question_type,
        yes_no_by_image,
    )
    from metalm.evaluation.tasks import builtin_task

    task = builtin_task("easyvqa")
    prior = wording_prior((ex.fields["question"], ex.answers[0]) for ex in task.examples("train"))
    by_id = {ex.id: ex for ex in task.examples(task.eval_split)}
    chosen = [by_id[r["id"]] for r in vqa if r["id"] in by_id]
    questions = {ex.id: ex.fields["question"] for ex in chosen}
    return {
        "easyvqa-wording-prior": wording_prior_by_question_type(
            ((ex.fields["question"], ex.answers) for ex in chosen), prior
        ),
        "easyvqa-against-prior": vqa_against_wording_prior(vqa, questions, prior),
        "easyvqa-by-image": yes_no_by_image(vqa, questions),
    }


def breakdown(eval_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """What the headline numbers hide: easy-VQA accuracy per question type and, per captioning task, how
    often a caption names the right colour and shape (from the evaluation's prediction files)."""
    from metalm.evaluation.breakdown import caption_by_attribute, vqa_by_question_type

    out: dict[str, dict[str, dict[str, float]]] = {}
    vqa = _predictions(eval_dir, "easyvqa")
    if vqa:
        out["easyvqa"] = vqa_by_question_type(vqa)
        out.update(wording_prior_tables(vqa))
    for task in CAPTION_TASKS:
        rows = _predictions(eval_dir, task)
        if rows:
            out[task] = caption_by_attribute(rows)
    return out


def breakdown_lines(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The breakdown as a markdown table (percent right, with the number of examples)."""
    from metalm.evaluation.breakdown import ATTRIBUTES, QUESTION_TYPES

    lines = ["| what | measure | colour | shape | yes/no |", "|---|---|---:|---:|---:|"]
    notes: list[str] = []  # sentences under the table

    def cell(row: dict[str, dict[str, float]], key: str) -> str:
        return f"{row[key]['accuracy']:.1f} (n={row[key]['n']})" if key in row else "–"

    if "easyvqa" in table:
        cells = [cell(table["easyvqa"], t) for t in QUESTION_TYPES]
        lines.append(f"| easy-VQA questions | VQA accuracy by question type | {' | '.join(cells)} |")
    if "easyvqa-wording-prior" in table:
        cells = [cell(table["easyvqa-wording-prior"], t) for t in QUESTION_TYPES]
        lines.append(
            "| the same questions, answered from their wording alone | training-split majority answer per "
            f"wording (no image) | {' | '.join(cells)} |"
        )
    if "easyvqa-against-prior" in table:
        cells = [cell(table["easyvqa-against-prior"], t) for t in QUESTION_TYPES]
        lines.append(
            "| the questions their wording alone gets wrong | VQA accuracy on them (only the image can "
            f"answer these) | {' | '.join(cells)} |"
        )
        against = table["easyvqa-against-prior"]
        by_attr = [f"{attr} {cell(against, f'yes/no: {attr}')}" for attr in ATTRIBUTES]
        notes.append(
            f"The yes/no questions their wording alone gets wrong, by the attribute asked about: {', '.join(by_attr)}."
        )
        from_wording = [a for a in ATTRIBUTES if against.get(f"yes/no: {a}", {}).get("accuracy", 100) < 50]
        if from_wording:
            why = (
                " (most easy-VQA questions about a colour ask about one the image lacks, so it says no to "
                '"is there a red shape?" on a red shape)'
                if "colour" in from_wording
                else ""
            )
            notes.append(
                f"Below a coin toss ({', '.join(from_wording)}): the model answers those yes/no questions from "
                f"their wording, not from the image{why}."
            )
    by_image = table.get("easyvqa-by-image", {})
    for where, says in (("in the image", "has"), ("not in the image", "lacks")):
        cells = [cell(by_image, f"{attr}, {where}") for attr in ATTRIBUTES]
        if any(c != "–" for c in cells):
            lines.append(
                f"| yes/no questions about a colour / shape the image {says} | VQA accuracy by the attribute "
                f"asked about | {' | '.join(cells)} | |"
            )
    for task, how in CAPTION_TASKS.items():
        if task in table:
            cells = [cell(table[task], a) for a in ATTRIBUTES]
            lines.append(
                f"| captions, {how} (`{task}`) | % naming the image's attribute | {' | '.join(cells)} | |"
            )
    return lines + (["", *notes] if notes else [])


def _sample_captions(eval_dir: Path, n: int = 8) -> list[str]:
    """Rows of the sample-captions table: the same test images captioned both ways."""
    by_task = {task: {r["id"]: r for r in _predictions(eval_dir, task)} for task in CAPTION_TASKS}
    first = next(iter(by_task.values()))
    lines = []
    for image_id, row in list(first.items())[:n]:
        gold = row.get("gold")
        gold = gold[0] if isinstance(gold, list) else gold
        generated = [by_task[t].get(image_id, {}).get("prediction", "–") for t in CAPTION_TASKS]
        lines.append(f"| {image_id} | {gold} | {' | '.join(generated)} |")
    return lines


def write_report(out: Path, cfg, result, summary: dict, chance: dict, train_s: float, eval_s: float) -> Path:
    from metalm.training.precision import describe_cpu

    table = breakdown(out / "eval")
    lines = [
        "# metalm quickstart report",
        "",
        f"Preset `{shown_preset(cfg.source)}`; {result.step} steps in {train_s / 60:.1f} min, evaluation in {eval_s / 60:.1f} min "
        f"({describe_cpu()}).",
        f"Final training loss {result.last_loss:.3f}"
        + (f", validation loss {result.last_val_loss:.3f}" if result.last_val_loss is not None else "")
        + f"; {result.tokens:,} training tokens. Model: `{result.final_dir}`.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Held-out results (test splits) against chance on the same examples",
        "",
        "| task | metric | metalm | chance |",
        "|---|---|---:|---|",
    ]
    for task, by_k in summary["results"].items():
        mean = by_k["0"]["mean"]
        ch = "; ".join(f"{k} {v:.1f}" for k, v in chance.get(task, {}).items())
        for metric, value in mean.items():
            lines.append(f"| {task} (n={by_k['0']['n']}) | {metric} | {value:.1f} | {ch} |")
    lines += [
        "",
        "easy-VQA answers are open-ended greedy generations scored with VQA accuracy (official normalization);",
        "Captions are greedy generations after the image alone (`easyvqa-caption-image`: the pre-training",
        "format of a caption without an encoded prefix) and after the image with the paper's encoded",
        '"Summarize this image:" (`easyvqa-caption`: held out; training asks for captions in five other ways),',
        "scored with",
        "pycocoevalcap CIDEr / BLEU-4 (x100). The chance column scores a random other image's caption (its",
        "CIDEr is high: all captions share one template). BBC topics are ranked by the log-likelihood of each",
        "topic name after `topic:`, a cue the quickstart never trains on (its news stream is plain documents):",
        "that row measures transfer only. VQA is not zero-shot here: the quickstart pre-trains on easy-VQA",
        "*training* question–answer pairs (the images and questions evaluated are held out).",
        "",
        "## What the model sees: VQA by question type, captions by attribute",
        "",
        *breakdown_lines(table),
        "",
        "A caption counts as right on an attribute when the first colour (shape) word it names is the image's. "
        "A model whose yes/no accuracy is no better than the wording-alone row answers from the question, not "
        "from the image (most easy-VQA yes/no questions ask about a colour the image does not have).",
        "",
        *in_context_section(out),
        "## Sample captions (held-out test images)",
        "",
        "| image | reference | " + " | ".join(CAPTION_TASKS.values()) + " |",
        "|---|---|" + "---|" * len(CAPTION_TASKS),
        *_sample_captions(out / "eval"),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "eval" / "breakdown.json").write_text(json.dumps(table, indent=2) + "\n")
    return path


def in_context_section(out: Path) -> list[str]:
    """The report's in-context learning table (from `eval-icl/`), with what it measures."""
    from metalm.evaluation.in_context import in_context_lines

    if not (out / "eval-icl").exists():
        return []
    vqa_summary = out / "eval-icl" / "easyvqa" / "summary.json"
    balanced = vqa_summary.is_file() and json.loads(vqa_summary.read_text()).get("per_group") is not None
    # A run evaluated before easy-VQA was asked per type is described as it was evaluated.
    questions = "the same number of questions of each type" if balanced else "the test split's mix of types"
    return [
        "## Learning from demonstrations (in-context)",
        "",
        *in_context_lines(out / "eval-icl"),
        "",
        "Mean ± spread over 3 seeds of demonstrations (k = 0: one run). easy-VQA: k random training-split "
        f"demonstrations before each test question, in the layout the model trained on, on {questions} "
        "(the same questions at every k); the last column is the mean change on those "
        "questions from no demonstrations to the most, ± its 95 % interval: a change inside its interval is not "
        "told apart from none. The yes/no rows after the types split those questions by what the image "
        "answers: whether it has the colour or shape asked about (most easy-VQA yes/no questions ask about one "
        "it lacks, so a model that says no when unsure keeps most of its yes/no score and loses the others). "
        "Fast binding: k "
        "demonstrations *per class* whose answers are made-up words (dax, blicket, ...) that no training "
        "row uses, so only the demonstrations tell the answer (chance 50 % for 2-way, 20 % for 5-way; "
        "k = 0 is 0 % by construction); `-real` asks the same episodes with the real names.",
        "",
    ]


RESULTS_BEGIN = "<!-- quickstart-results:begin (written by `metalm quickstart --results-page`) -->"
RESULTS_END = "<!-- quickstart-results:end -->"


def results_section(out: Path, train_s: float, eval_s: float) -> list[str]:
    """The quickstart's part of docs/results.md, from the run's own evaluation files."""
    from metalm.training.precision import describe_cpu

    summary_file = out / "eval" / "summary.json"
    summary = json.loads(summary_file.read_text())
    evaluated_on = time.strftime("%Y-%m-%d", time.localtime(summary_file.stat().st_mtime))  # the run's day
    headline = "; ".join(
        f"{task} {metric} {value:.1f}"
        for task, by_k in summary["results"].items()
        for metric, value in by_k["0"]["mean"].items()
    )
    return [
        RESULTS_BEGIN,
        f"`metalm quickstart --output-dir {out}` on {evaluated_on}: training "
        f"{train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min ({describe_cpu()}); {summary['limit']} held-out "
        f"test examples per task, k = 0. Headline: {headline}.",
        "",
        "This block is rewritten by each `metalm quickstart --results-page` run; the tables above come from "
        "`scripts/interface_results.py`'s own runs, which it does not redo: where the preset changed since, "
        "they describe the earlier one (`git log -p configs/quickstart.yaml docs/results.md`).",
        "",
        *breakdown_lines(breakdown(out / "eval")),
        "",
        *in_context_section(out),
        "| image | reference | " + " | ".join(CAPTION_TASKS.values()) + " |",
        "|---|---|" + "---|" * len(CAPTION_TASKS),
        *_sample_captions(out / "eval", n=6),
        RESULTS_END,
    ]


def update_results_page(
    page: Path, section: list[str], begin: str = RESULTS_BEGIN, end: str = RESULTS_END
) -> None:
    """Replace a section of a results page (the quickstart's unless other markers are named) between its
    markers; appended if absent."""
    text = page.read_text() if page.exists() else ""
    block = "\n".join(section)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.write_text(text)


def quickstart(
    output_dir: str = "runs/quickstart",
    max_steps: int | None = None,
    eval_limit: int | None = 300,
    overrides: list[str] | None = None,
    config: str = "quickstart",
    results_page: str | None = None,
) -> Path:
    """Train the quickstart preset, evaluate it, write the report. Returns the report path."""
    from transformers import AutoModelForCausalLM

    import metalm

    metalm.register()  # the Auto classes (idempotent)
    from metalm.data.processor import MetaLMProcessor
    from metalm.evaluation.in_context import evaluate_in_context
    from metalm.evaluation.runner import evaluate
    from metalm.model.feature_cache import cache_features
    from metalm.training.config import load_config
    from metalm.training.trainer import train

    extra = [f"run.output_dir={output_dir}", *(overrides or [])]
    if max_steps is not None:
        extra.append(f"optim.max_steps={max_steps}")
    cfg = load_config(preset_path(config), extra)
    out = Path(cfg.run.output_dir)
    print(f"[metalm quickstart] 1/3 training {cfg.source} into {out}")
    t0 = time.time()
    result = train(cfg)
    train_s = time.time() - t0

    print(f"[metalm quickstart] 2/3 evaluating {result.final_dir} on held-out easy-VQA and BBC News")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    processor = MetaLMProcessor.from_pretrained(result.final_dir)
    if cfg.run.feature_cache:  # the demonstrations are training images: their features are cached already
        cache_features(model, processor, cfg.run.feature_cache)
    summary = evaluate(
        model, processor, ["easyvqa-caption-image", "easyvqa-caption", "easyvqa", "bbc-topic"], shots=(0,), limit=eval_limit,
        batch_size=32, out_dir=out / "eval", model_name=str(result.final_dir),
    )  # fmt: skip
    # A third of the examples per fast-binding task. easy-VQA asks half that many of each question type
    # (150 by default, about as long to run as the 100 in the split's mix they replaced, where 13 were colour
    # questions), and the report gives each type's change with its interval.
    icl_limit = max(1, eval_limit // 3) if eval_limit else None
    per_type = max(1, icl_limit // 2) if icl_limit else None
    print(
        f"[metalm quickstart] in-context: easy-VQA ({per_type or 'all'} per question type) and fast binding "
        f"({icl_limit or 'all'} per task) at k = 1, 4"
    )
    evaluate_in_context(
        model, processor, out / "eval-icl", limit=icl_limit, per_type=per_type, batch_size=32,
        fastbind=QUICKSTART_FASTBIND,
    )  # fmt: skip
    chance = chance_baselines(eval_limit)
    eval_s = time.time() - t0
    (out / "eval" / "chance.json").write_text(json.dumps(chance, indent=2) + "\n")

    report = write_report(out, cfg, result, summary, chance, train_s, eval_s)
    if results_page:
        update_results_page(Path(results_page), results_section(out, train_s, eval_s))
    print(f"[metalm quickstart] 3/3 report: {report}")
    print(report.read_text())
    return report


def add_quickstart_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quickstart",
        help="pre-train a small MetaLM on packaged data and evaluate it (about 9-10 min on 2 AVX2 cores, less with AVX-512)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="runs/quickstart")
    p.add_argument("--max-steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--eval-limit", type=int, default=300, help="examples per evaluation task (0 = all)")
    p.add_argument("--config", default="quickstart", help="preset name or YAML path")
    p.add_argument(
        "--results-page",
        default=None,
        help="also rewrite the quickstart section of this page (docs/results.md)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=5e-4")
    p.set_defaults(
        func=lambda a: (
            quickstart(a.output_dir, a.max_steps, a.eval_limit or None, a.overrides, a.config, a.results_page)
            and 0
        )
    )
    return p

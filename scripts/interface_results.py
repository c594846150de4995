"""Does the language model work as a general-purpose interface? Writes docs/results.md.

Four models, each evaluated the same way:

- **gemma-vl**: the packaged MiniLM and EfficientNet-Lite0 docked onto the frozen packaged Gemma-3-270M
  (`configs/gemma-vl.yaml`);
- **quickstart**: the small MetaLM trained from scratch (`configs/quickstart.yaml`);
- **gpt-baseline**: the quickstart's decoder and data with no encoders (`configs/gpt-baseline.yaml`);
- **gemma-bare**: Gemma-3-270M itself, no encoders, every input as plain text (the GPT-style anchor).

Rows: zero-shot captioning with the paper's "Summarize this image:" (CIDEr and per-attribute correctness)
and from the image alone; easy-VQA 0/1/4-shot by question type; fast binding (made-up names only the
demonstrations give, k = 1/2/4 per class); BBC topic in-context learning at k = 0/1/4
with demonstrations through the encoder and as plain text; the paper's frozen-decoder single-task
finetuning on BBC topics (LR 5e-5, batch 32, 3 epochs; per seed); and "does the decoder read the
encoder": held-out loss on the text after a span given encoded / removed / as plain text.

Every number on the page comes from this script's own outputs under `--out` (prediction files, summaries,
training runs); a step whose outputs exist is not run again, so an interrupted run resumes.

    python scripts/interface_results.py                       # everything (hours on 2 CPU cores)
    python scripts/interface_results.py --models quickstart --limit 100 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.experiments import cached_eval, load_model, train_once
from metalm.evaluation.reads_encoder import MIN_GAP, gap_closed

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "metalm" / "configs"
PAGE = REPO / "docs" / "results.md"
MODELS = ("gemma-vl", "quickstart", "gpt-baseline", "gemma-bare")
TRAINED = {"gemma-vl": "gemma-vl.yaml", "quickstart": "quickstart.yaml", "gpt-baseline": "gpt-baseline.yaml"}
VQA_SHOTS = (0, 1, 4)
FASTBIND_SHOTS = (1, 2, 4)  # demonstrations per class
FASTBIND_TASKS = (
    "fastbind-shape-2way",
    "fastbind-shape-2way-real",
    "fastbind-color-2way",
    "fastbind-color-5way",
)
logger = logging.getLogger("interface_results")


# --- models --------------------------------------------------------------------------------------------
def trained_model(name: str, runs: Path) -> Path:
    """`runs/<name>/final`, trained from its preset unless it exists."""
    return train_once(CONFIGS / TRAINED[name], runs / name)


def bare_gemma(runs: Path) -> Path:
    """Gemma-3-270M as a MetaLM with no encoders: every input is plain decoder text."""
    from metalm import ModelRecipe

    folder = runs / "gemma-bare" / "final"
    if not (folder / "config.json").is_file():
        model, processor = ModelRecipe(decoder="packaged:gemma3-270m", decoder_trainable=False).build()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def model_dir(name: str, runs: Path) -> Path:
    return bare_gemma(runs) if name == "gemma-bare" else trained_model(name, runs)


# --- evaluations ---------------------------------------------------------------------------------------
def per_seed_breakdown(out: Path, task: str, k: int, fn) -> dict[str, dict[str, float]]:
    """A breakdown (by question type or attribute) as mean and std over the seeds' prediction files."""
    from metalm.evaluation.breakdown import read_predictions

    tables = [fn(read_predictions(p)) for p in sorted(out.glob(f"predictions-{task}-k{k}-s*.jsonl"))]
    merged: dict[str, dict[str, float]] = {}
    for key in tables[0] if tables else {}:
        values = [t[key]["accuracy"] for t in tables if key in t]
        merged[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": tables[0][key]["n"],
        }
    return merged


def evaluate_model(name: str, folder: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from metalm.evaluation.breakdown import caption_by_attribute, vqa_by_question_type

    model, processor = load_model(folder)
    has_text = any(s["kind"] == "text" for s in model.config.encoders)
    kw = {"limit": args.limit, "batch_size": args.batch_size, "progress": True}
    res: dict[str, Any] = {"has_text_encoder": has_text}
    for task in ("easyvqa-caption", "easyvqa-caption-image"):
        summary = cached_eval(out / task, model, processor, task, [0], args.seeds[:1], **kw)
        res[task] = {
            "cider": summary["results"][task]["0"]["mean"].get("CIDEr"),
            "attributes": per_seed_breakdown(out / task, task, 0, caption_by_attribute),
        }
    vqa = cached_eval(out / "easyvqa", model, processor, "easyvqa", VQA_SHOTS, args.seeds, **kw)
    res["easyvqa"] = {
        str(k): {
            "all": vqa["results"]["easyvqa"][str(k)]["mean"],
            "by_type": per_seed_breakdown(out / "easyvqa", "easyvqa", k, vqa_by_question_type),
        }
        for k in VQA_SHOTS
    }
    if any(s["kind"] == "vision" for s in model.config.encoders):
        binding = cached_eval(
            out / "fastbind", model, processor, list(FASTBIND_TASKS), FASTBIND_SHOTS, args.seeds,
            **{**kw, "limit": args.fastbind_limit},
        )  # fmt: skip
        res["fastbind"] = binding["results"]
    modes = {"encoded": False, "plain": True} if has_text else {"plain": True}
    res["bbc-topic"] = {
        mode: cached_eval(
            out / f"bbc-topic-{mode}",
            model,
            processor,
            "bbc-topic",
            args.bbc_shots,
            args.seeds,
            baseline=baseline,
            **{**kw, "limit": args.bbc_limit},
        )["results"]["bbc-topic"]  # fmt: skip
        for mode, baseline in modes.items()
    }
    golds = [
        json.loads(line)["gold"]
        for line in (out / "bbc-topic-plain" / "predictions-bbc-topic-k0-s0.jsonl").open()
    ]
    res["bbc_majority"] = 100 * max(golds.count(g) for g in set(golds)) / len(golds)
    if has_text:
        res["reads_encoder"] = reads_encoder(out / "reads-encoder.json", model, processor, args)
    return res


def reads_encoder(path: Path, model, processor, args: argparse.Namespace) -> dict[str, Any]:
    """The probe's result (cached in `path`)."""
    from metalm.data.builtin import load_builtin
    from metalm.evaluation.reads_encoder import reads_encoder_losses

    if path.is_file():
        return json.loads(path.read_text())
    docs = [r.text for r in load_builtin("bbc_news_text", "test")][: args.bbc_limit]
    result = reads_encoder_losses(model, processor, docs, span_tokens=32, continuation_tokens=32)
    path.write_text(json.dumps(result, indent=2))
    return result


def frozen_decoder_finetune(name: str, folder: Path, runs: Path, out: Path, args) -> dict[str, Any]:
    """The paper's single-task protocol on BBC topics (configs/finetune-frozen-decoder.yaml), per seed."""
    from metalm.training.config import load_config

    # By default each article is cut to the model's own pre-training window (Gemma's 48 positions cost as
    # much as 128 of the small decoder's); --finetune-window sets another, named in the run folders.
    own = load_config(CONFIGS / TRAINED[name]).data.seq_len
    window = args.finetune_window or own
    tag = "" if window == own else f"-w{window}"
    scores = {}
    for seed in args.finetune_seeds or args.seeds:
        run = runs / f"{name}-bbc-frozen{tag}-s{seed}"
        overrides = [f"init_from={folder}", f"run.seed={seed}", f"data.seq_len={window}"]
        final = train_once(CONFIGS / "finetune-frozen-decoder.yaml", run, overrides + args.finetune_override)
        model, processor = load_model(final)
        limit = args.finetune_limit or args.bbc_limit
        summary = cached_eval(out / f"bbc-frozen{tag}-n{limit}-s{seed}", model, processor, "bbc-topic", [0],
                              [seed], limit=limit, batch_size=args.batch_size)  # fmt: skip
        scores[str(seed)] = summary["results"]["bbc-topic"]["0"]["mean"]
    return {"window": window, "seeds": scores}


# --- the page ------------------------------------------------------------------------------------------
def _pm(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" if not std else f"{mean:.1f} ± {std:.1f}"


def _caption_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | prompt | CIDEr | colour right (%) | shape right (%) |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        for task, prompt in (
            ("easyvqa-caption", '"Summarize this image:"'),
            ("easyvqa-caption-image", "image alone"),
        ):
            attrs = r[task]["attributes"]
            rows.append(
                f"| {name} | {prompt} | {_pm(r[task]['cider'])} | {_pm(attrs.get('colour', {}).get('mean'))} "
                f"| {_pm(attrs.get('shape', {}).get('mean'))} |"
            )
    return rows


def wording_prior(results: dict[str, Any], out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per model, from its k = 0 predictions on the same fixed subset: what answering each question from its
    wording alone scores (``easyvqa-wording-prior``, the same for every model) and what the model scores on
    the questions that wording gets wrong (``easyvqa-against-prior``)."""
    from metalm.evaluation.breakdown import read_predictions
    from metalm.quickstart import wording_prior_tables

    tables = {}
    for name in results:
        path = out / name / "easyvqa" / "predictions-easyvqa-k0-s0.jsonl"
        if path.is_file():
            tables[name] = wording_prior_tables(read_predictions(path))
    return tables


def _vqa_rows(results: dict[str, Any], out: Path) -> list[str]:
    types = ("colour", "shape", "yes/no")
    rows = [
        "| model | k | all | colour | shape | yes/no | yes/no its wording gets wrong |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    prior = wording_prior(results, out)
    for name, r in results.items():
        for k, entry in r["easyvqa"].items():
            by = entry["by_type"]
            cells = [_pm(by[t]["mean"], by[t]["std"]) if t in by else "—" for t in types]
            against = prior.get(name, {}).get("easyvqa-against-prior", {}).get("yes/no")
            hard = f"{against['accuracy']:.1f} (n={against['n']})" if str(k) == "0" and against else "—"
            rows.append(
                f"| {name} | {k} | {_pm(entry['all']['vqa_accuracy'])} | "
                + " | ".join(cells)
                + f" | {hard} |"
            )
    if prior:
        alone = next(iter(prior.values()))["easyvqa-wording-prior"]
        cells = [_pm(alone[t]["accuracy"]) if t in alone else "—" for t in types]
        rows.append("| the question's wording alone (no image) | – | – | " + " | ".join(cells) + " | 0 |")
    return rows


def _fastbind_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | task | " + " | ".join(f"k={k} per class" for k in FASTBIND_SHOTS) + " |"]
    rows.append("|---|---|" + "---:|" * len(FASTBIND_SHOTS))
    for name, r in results.items():
        for task, by_k in (r.get("fastbind") or {}).items():
            cells = [
                _pm(by_k[str(k)]["mean"]["accuracy"], by_k[str(k)]["std"].get("accuracy"))
                if str(k) in by_k
                else "—"
                for k in FASTBIND_SHOTS
            ]
            rows.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return rows


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _icl_bars(name: str, r: dict[str, Any]) -> list[str]:
    """The in-context bars for one model, each with the measured figures it is judged on."""
    rows = []
    vqa = r["easyvqa"]
    if "0" in vqa and "4" in vqa:
        pairs = {t: (vqa["0"]["by_type"].get(t, {}).get("mean"), vqa["4"]["by_type"].get(t, {}).get("mean"))
                 for t in ("colour", "shape", "yes/no")}  # fmt: skip
        shown = ", ".join(
            f"{t} {a:.1f} → {b:.1f}" for t, (a, b) in pairs.items() if a is not None and b is not None
        )
        ok = all(b >= a for a, b in pairs.values() if a is not None and b is not None)
        rows.append(
            f"| {name} | easy-VQA by question type, k = 4 ≥ k = 0 (mean of seeds) | {shown} | {_verdict(ok)} |"
        )
    binding = (r.get("fastbind") or {}).get("fastbind-shape-2way")
    if binding and "1" in binding and "4" in binding:
        bar = 80 if name == "gemma-vl" else 70
        k1, k4 = binding["1"]["mean"]["accuracy"], binding["4"]["mean"]["accuracy"]
        rows.append(
            f"| {name} | fast binding, shape 2-way, made-up names, 4 per class ≥ {bar} % and rising from k = 1 "
            f"| k = 1 {k1:.1f}, k = 4 {k4:.1f} | {_verdict(k4 >= bar and k4 > k1)} |"
        )
    topic = r.get("bbc-topic", {})
    if "encoded" in topic and "plain" in topic:
        shots = [k for k in topic["encoded"] if k != "0" and k in topic["plain"]]
        cells = [
            (k, topic["encoded"][k]["mean"]["accuracy"], topic["plain"][k]["mean"]["accuracy"]) for k in shots
        ]
        shown = ", ".join(f"k = {k}: {e:.1f} vs {p:.1f}" for k, e, p in cells)
        verdict = _verdict(all(e >= p - 5 for _, e, p in cells) if cells else None)
        majority = r.get("bbc_majority")
        if verdict == "met" and majority is not None and all(max(e, p) <= majority for _, e, p in cells):
            verdict = (
                f"met only vacuously: both at or below always answering the majority topic ({majority:.1f})"
            )
        rows.append(
            f"| {name} | BBC topic, demonstrations through the encoder ≥ as plain text − 5 | {shown} | {verdict} |"
        )
    probe = r.get("reads_encoder")
    if probe:
        gap = gap_closed(probe["loss"])
        shown = "—" if gap is None else f"{gap:.2f}"
        rows.append(
            f"| {name} | does the decoder read the encoder: gap closed ≥ 0.50 | {shown} | {_verdict(None if gap is None else gap >= 0.5)} |"
        )
    return rows


def _bar_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | bar | measured | verdict |", "|---|---|---|---|"]
    for name in ("quickstart", "gemma-vl"):
        if name in results:
            rows += _icl_bars(name, results[name])
    return rows


def _bbc_rows(results: dict[str, Any]) -> list[str]:
    shots = sorted({k for r in results.values() for by_k in r["bbc-topic"].values() for k in by_k}, key=int)
    rows = ["| model | demonstrations | " + " | ".join(f"k={k}" for k in shots) + " |"]
    rows.append("|---|---|" + "---:|" * len(shots))
    for name, r in results.items():
        for mode, by_k in r["bbc-topic"].items():
            how = "through the encoder" if mode == "encoded" else "as plain text"
            cells = [
                _pm(by_k[k]["mean"]["accuracy"], by_k[k]["std"].get("accuracy")) if k in by_k else "—"
                for k in shots
            ]
            rows.append(f"| {name} | {how} | " + " | ".join(cells) + " |")
    return rows


def _finetune_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | positions per sample | accuracy per seed | mean ± std | macro-F1 mean |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        if not r.get("bbc_frozen"):
            continue
        window, scores = r["bbc_frozen"]["window"], r["bbc_frozen"]["seeds"]
        acc = [v["accuracy"] for v in scores.values()]
        f1 = [v["macro_f1"] for v in scores.values()]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = ", ".join(f"s{s}: {v['accuracy']:.1f}" for s, v in scores.items())
        rows.append(
            f"| {name} | {window} | {per_seed} | {_pm(statistics.fmean(acc), std)} | "
            f"{_pm(statistics.fmean(f1))} |"
        )
    return rows


def _reads_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | span encoded | span removed | span as plain text | gap closed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        probe = r.get("reads_encoder")
        if probe:
            loss, gap = probe["loss"], gap_closed(probe["loss"])  # from the losses, whatever was cached
            rows.append(
                f"| {name} | {loss['encoded']:.3f} | {loss['removed']:.3f} | {loss['plain']:.3f} "
                f"| {'—' if gap is None else f'{gap:.2f}'} |"
            )
    return rows


def write_page(results: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    """The results page, every number from `results` (this script's outputs)."""
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# Results: the language model as a general-purpose interface",
        "",
        "Written by `scripts/interface_results.py` from its own outputs "
        f"(`{' '.join(['python scripts/interface_results.py', *(sys.argv[1:])])}`, on this 2-core CPU machine; "
        "each step's outputs are kept under `--out` and reused by a rerun, "
        f"this invocation took {seconds / 60:.0f} min, reusing every step whose outputs existed). Seeds {seeds} (demonstration draws and finetuning runs; k = 0 "
        "and captioning are greedy "
        f"and run once). {args.limit} easy-VQA questions / images and {args.bbc_limit} BBC articles per task "
        "(fixed random subsets of the test splits). Scores ×100; ± is the sample std over seeds.",
        "",
        *(
            [
                f"Not rerun in this invocation (their earlier figures are in this page's git history): "
                f"{', '.join(m for m in MODELS if m not in results)}.",
                "",
            ]
            if any(m not in results for m in MODELS)
            else []
        ),  # fmt: skip
        "Models: **gemma-vl** = packaged MiniLM + EfficientNet-Lite0 docked onto the frozen packaged "
        "Gemma-3-270M (`configs/gemma-vl.yaml`); **quickstart** = the small MetaLM trained from scratch; "
        "**gpt-baseline** = the quickstart's decoder and data without encoders (it never sees images); "
        "**gemma-bare** = Gemma-3-270M alone, inputs as plain text.",
        "",
        "## Zero-shot captioning",
        "",
        "Chance for the colour of a caption is 1 in 8 (12.5 %), for the shape 1 in 3.",
        "",
        *_caption_rows(results),
        "",
        "## Easy-VQA by question type (k = 0, 1 and 4)",
        "",
        "k random training-split demonstrations before each test question (drawn per question and seed), "
        "each an image, its encoded question and its answer closed by EOS, in the layout the model trained "
        "on (demonstrations and query alike; the paper's capitalised few-shot prompt is used only for a "
        "model that saved no layout).",
        "",
        *_vqa_rows(results, args.out),
        "",
        "## Fast binding: answers only the demonstrations give",
        "",
        "After Frozen's open-ended miniImageNet: each test image is a query in an episode of 2 (or 5) "
        "classes of one attribute (shape, colour), each class named by a made-up word (dax, blicket, ...) "
        "that appears only in the demonstrations and that no training row ever uses; k demonstrations per "
        "class (an image, the attribute's question, the class's word), shuffled; then the query. Greedy "
        "answer, exact match. Chance 50 % (2-way) / 20 % (5-way); with no demonstrations 0 % by "
        "construction. `-real`: the same episodes with the real names.",
        "",
        *_fastbind_rows(results),
        "",
        "## BBC topic, in-context learning",
        "",
        "Five topics ranked after `topic:`; the most frequent topic is "
        f"{next(iter(results.values()))['bbc_majority']:.1f} % of the evaluated articles (always answering it "
        "scores that).",
        "",
        *_bbc_rows(results),
        "",
        "## BBC topic, frozen-decoder single-task finetuning",
        "",
        "The paper's protocol (`configs/finetune-frozen-decoder.yaml`: decoder frozen, LR 5e-5, batch 32, "
        f"3 epochs), one run per seed, evaluated zero-shot on {args.finetune_limit or args.bbc_limit} test "
        "articles (a fixed random subset; the evaluation reads each article's first 64 words). In training "
        "each article is cut, word by word, so that BOS + article + `topic:` + label + EOS fill the positions "
        "per sample given in the table (by default the model's own pre-training window, its preset's "
        "`data.seq_len`; `--finetune-window`), counted in train.log.",
        "",
        *(
            _finetune_rows(results)
            if any(r.get("bbc_frozen") for r in results.values())
            else ["Not run in this invocation (`--no-finetune`): no row here is measured."]
        ),
        "",
        "## Does the decoder read the encoder?",
        "",
        "Mean loss (nats per token) of 32 BBC test tokens after a 32-token span that is encoded by the text "
        "encoder, removed, or given as plain decoder text. Gap closed = (removed − encoded) / (removed − "
        "plain): 1 means the encoded span helps as much as reading it, 0 as if it were absent; — where plain "
        f"text helps by less than {MIN_GAP} nats (then no share is meaningful).",
        "",
        *_reads_rows(results),
        "",
        "## The in-context bars, judged on the figures above",
        "",
        *_bar_rows(results),
        "",
        'What the presets train for it (docs/training.md, "The in-context format"): the quickstart adds easy-VQA '
        "in-context rows (2–6 random demonstrations and a query per 128-position window, every answer trained) "
        "beside its single VQA stream; gemma-vl adds the same rows and binding rows (one attribute question "
        "throughout, answers renamed by made-up words in every row). Tried for the quickstart and left out of "
        "its preset: relabelled rows (a quarter of its in-context rows: fast binding 0 %, it answered with "
        "made-up-looking strings of its own), and 200 extra steps of binding rows alone (still 0 %, and "
        "colour and shape answers broke): an 11M decoder trained for minutes has no copying ability to "
        "build binding on. The frozen Gemma copies a demonstration's name but matches images to it weakly. "
        "Not built: semi-causal text rows whose encoded spans must be read to predict what follows, and "
        "in-context rows of a text-classification task other than the evaluated one, which the BBC and "
        "reads-the-encoder bars would need.",
        "",
        "## What this shows and what it does not",
        "",
        "- It shows, per attribute and per question type, whether each model uses what its encoders see; an "
        "average alone would hide a model that gets shapes right and colours at chance.",
        "- It does not show the paper's scale: the decoders are 11M (quickstart) and 270M (Gemma) "
        "parameters, trained for minutes on 2 CPU cores, on synthetic shapes and one news corpus.",
        "- The captioning prompt is held out: gemma-vl and the quickstart train captioning on request with five "
        'other phrasings (their `described` stream), never "Summarize this image:" itself; the GPT baseline '
        "and bare Gemma never train on captions by request.",
        "- A yes/no accuracy at the level of the \"question's wording alone\" row (the training split's most "
        "common answer for each wording, colour and shape words masked, no image) says the model answers "
        "from the question, not from the image; the last column scores each model on the yes/no questions "
        "that row gets wrong (only the image can answer them; the wording alone scores 0 there).",
        "- The subsets are small (see above): differences of a few points are within noise.",
        "",
    ]
    return "\n".join(lines)


def append_quickstart_run(page: Path, run: Path) -> None:
    """The quickstart run's own section (its breakdown on 300 examples and sample captions), from its files."""
    from metalm.quickstart import results_section, update_results_page

    # The report's first line holds the evaluation time ("evaluation in 1.2 min"); training time is logged.
    found = re.search(r"evaluation in ([\d.]+) min", (run / "report.md").read_text())
    eval_s = 60 * float(found.group(1)) if found else 0.0
    train_s = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    page.write_text(
        page.read_text().rstrip("\n")
        + "\n\n## The quickstart run itself (300 test examples per task, sample captions)\n\n"
        "Its times are that run's wall-clock times; where other jobs shared the 2 cores they overstate what the "
        "quickstart costs on its own (the machine's load is not recorded).\n"
    )
    update_results_page(page, results_section(run, train_s, eval_s))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--runs", type=Path, default=REPO / "runs")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "interface-results")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=300, help="easy-VQA questions / images per task")
    p.add_argument("--bbc-limit", type=int, default=100, help="BBC articles per task")
    p.add_argument("--fastbind-limit", type=int, default=100, help="fast-binding queries per task")
    p.add_argument("--bbc-shots", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 4])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-finetune", action="store_true", help="skip the frozen-decoder BBC finetunes")
    p.add_argument(
        "--finetune-seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="seeds of the BBC finetunes (default: --seeds)",
    )
    p.add_argument(
        "--finetune-models", nargs="+", default=None, help="models to finetune (default: all but gemma-bare)"
    )
    p.add_argument(
        "--finetune-limit",
        type=int,
        default=None,
        help="BBC test articles for the finetuned models (default: --bbc-limit)",
    )
    p.add_argument(
        "--finetune-window",
        type=int,
        default=None,
        help="positions per finetuning sample (default: each model's pre-training window)",
    )
    p.add_argument("--finetune-override", nargs="*", default=[], help="key=value for the finetune config")
    p.add_argument("--page", type=Path, default=PAGE)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.time()
    results: dict[str, Any] = {}
    for name in args.models:
        folder = model_dir(name, args.runs)
        results[name] = evaluate_model(name, folder, args.out / name, args)
        if not args.no_finetune and name != "gemma-bare" and name in (args.finetune_models or MODELS):
            results[name]["bbc_frozen"] = frozen_decoder_finetune(
                name, folder, args.runs, args.out / name, args
            )
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    args.page.write_text(write_page(results, args, time.time() - start))
    if "quickstart" in results:
        append_quickstart_run(args.page, args.runs / "quickstart")
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

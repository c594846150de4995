"""The results page of scripts/interface_results.py: tables and prose, every number from its results."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from results_bars import bar_sections, pm, retrieved_section

from metalm.evaluation.reads_encoder import MIN_GAP, gap_closed

MODELS = ("gemma-vl", "gemma-vl-icl", "quickstart", "gpt-baseline", "gemma-bare")
VQA_SHOTS = (0, 1, 4)
FASTBIND_SHOTS = (1, 2, 4)  # demonstrations per class


def _caption_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | prompt | CIDEr | colour right (%) | shape right (%) |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        for task, prompt in (
            ("easyvqa-caption", '"Summarize this image:"'),
            ("easyvqa-caption-image", "image alone"),
        ):
            attrs = r[task]["attributes"]
            rows.append(
                f"| {name} | {prompt} | {pm(r[task]['cider'])} | {pm(attrs.get('colour', {}).get('mean'))} "
                f"| {pm(attrs.get('shape', {}).get('mean'))} |"
            )
    return rows


def wording_prior(results: dict[str, Any], out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per model, from its k = 0 predictions on the same fixed subset: what answering each question from its
    wording alone scores (``easyvqa-wording-prior``, the same for every model) and what the model scores on
    the questions that wording gets wrong (``easyvqa-against-prior``)."""
    from metalm.evaluation.prediction_files import prediction_path, read_predictions
    from metalm.quickstart import wording_prior_tables

    tables = {}
    for name in results:
        path = prediction_path(out / name / "easyvqa", "easyvqa", 0, 0)
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
            cells = [pm(by[t]["mean"], by[t]["std"]) if t in by else "—" for t in types]
            against = prior.get(name, {}).get("easyvqa-against-prior", {}).get("yes/no")
            hard = f"{against['accuracy']:.1f} (n={against['n']})" if str(k) == "0" and against else "—"
            rows.append(
                f"| {name} | {k} | {pm(entry['all']['vqa_accuracy'])} | " + " | ".join(cells) + f" | {hard} |"
            )
    if prior:
        alone = next(iter(prior.values()))["easyvqa-wording-prior"]
        cells = [pm(alone[t]["accuracy"]) if t in alone else "—" for t in types]
        rows.append("| the question's wording alone (no image) | – | – | " + " | ".join(cells) + " | 0 |")
    return rows


def _fastbind_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| model | task | " + " | ".join(f"k={k} per class" for k in FASTBIND_SHOTS) + " |"]
    rows.append("|---|---|" + "---:|" * len(FASTBIND_SHOTS))
    for name, r in results.items():
        for task, by_k in (r.get("fastbind") or {}).items():
            cells = [
                pm(by_k[str(k)]["mean"]["accuracy"], by_k[str(k)]["std"].get("accuracy"))
                if str(k) in by_k
                else "—"
                for k in FASTBIND_SHOTS
            ]
            rows.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return rows


def _copying_rows(results: dict[str, Any]) -> list[str]:
    """The copy probe per model: loss on random tokens shown once, and on their repeat."""
    probed = {name: r["copying"] for name, r in results.items() if r.get("copying")}
    if not probed:
        return []
    first = next(iter(probed.values()))
    rows = [
        f"Does the decoder copy at all? {first['sequences']} sequences of {first['length']} random tokens, each "
        "shown twice as plain decoder text (`metalm.evaluation.copying`): loss in nats a token on the first "
        "showing and on the repeat. A decoder with induction heads predicts the repeat; fast binding is "
        "that copying with a fuzzy match (the name after the demonstration whose image matches the query).",
        "",
        "| model | first showing | repeat | copied (first − repeat) |",
        "|---|---:|---:|---:|",
    ]
    for name, c in probed.items():
        gain = c["first_loss"] - c["repeat_loss"]
        rows.append(f"| {name} | {c['first_loss']:.2f} | {c['repeat_loss']:.2f} | {gain:.2f} |")
    rows.append("")
    for name, r in results.items():
        rows += _copy_training_lines(name, r.get("copy_training"))
    return rows


def _copy_training_lines(name: str, probe: dict[str, Any] | None) -> list[str]:
    """How far training on nothing but repeats took a decoder (scripts/copy_training_probe.py)."""
    if not probe or not probe["curve"]:
        return []
    curve, chance = probe["curve"], probe["chance_loss"]
    tail = curve[-5:]
    low = min(curve, key=lambda c: c["repeat_loss"])
    mean_tail = sum(c["repeat_loss"] for c in tail) / len(tail)
    return [
        f"Can {name}'s decoder learn to copy within a budget? `python scripts/copy_training_probe.py --model "
        f"runs/{name}/final --steps {probe['steps']}` trains it on nothing but random sequences of up to "
        f"{probe['length']} of {probe['vocab']} tokens shown twice (loss on the repeat only, batch "
        f"{probe['batch_size']}, lr {probe['lr']:g}; {curve[-1]['seconds'] / 60:.1f} min on 2 cores). The "
        f"repeat's loss on a held-out batch: {curve[0]['repeat_loss']:.2f} at step {curve[0]['step']}, "
        f"{mean_tail:.2f} on average over the last {len(tail)} checks (steps {tail[0]['step']}-{tail[-1]['step']}), "
        f"lowest {low['repeat_loss']:.2f} (step {low['step']}), against {chance:.2f} (ln {probe['vocab']}) for "
        "not copying and near 0 for a decoder that copies.",
        "",
    ]


def _bbc_rows(results: dict[str, Any]) -> list[str]:
    shots = sorted({k for r in results.values() for by_k in r["bbc-topic"].values() for k in by_k}, key=int)
    rows = ["| model | demonstrations | " + " | ".join(f"k={k}" for k in shots) + " |"]
    rows.append("|---|---|" + "---:|" * len(shots))
    for name, r in results.items():
        for mode, by_k in r["bbc-topic"].items():
            how = "through the encoder" if mode == "encoded" else "as plain text"
            cells = [
                pm(by_k[k]["mean"]["accuracy"], by_k[k]["std"].get("accuracy")) if k in by_k else "—"
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
            f"| {name} | {window} | {per_seed} | {pm(statistics.fmean(acc), std)} | "
            f"{pm(statistics.fmean(f1))} |"
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


def _header(
    results: dict[str, Any], args: argparse.Namespace, seconds: float, binding: dict[str, Any]
) -> list[str]:
    seeds = ", ".join(map(str, args.seeds))
    missing = [m for m in MODELS if m not in results and m not in binding]
    partly = [f"{m} (only the caption-text fast-binding tasks)" for m in binding if m not in results]
    return [
        "# Results: the language model as a general-purpose interface",
        "",
        "Written by `scripts/interface_results.py` from its own outputs "
        f"(`{' '.join(['python scripts/interface_results.py', *(sys.argv[1:])])}`, on this 2-core CPU machine; "
        "each step's outputs are kept under `--out` and reused by a rerun, "
        f"this invocation took {seconds / 60:.0f} min, reusing every step whose outputs existed). Seeds {seeds} "
        "(demonstration draws and finetuning runs; k = 0 and captioning are greedy and run once). "
        f"{args.limit} easy-VQA questions / images and {args.bbc_limit} BBC articles per task "
        "(fixed random subsets of the test splits). Scores ×100; ± is the sample std over seeds.",
        "",
        *(
            [
                f"Not rerun in this invocation (their earlier figures are in this page's git history): "
                f"{', '.join(missing)}.",
                "",
            ]
            if missing
            else []
        ),  # fmt: skip
        *([f"Evaluated in part: {', '.join(partly)}.", ""] if partly else []),
        "Models: **gemma-vl** = packaged MiniLM + EfficientNet-Lite0 docked onto the frozen packaged "
        "Gemma-3-270M (`configs/gemma-vl.yaml`); **gemma-vl-icl** = gemma-vl with LoRA adapters on Gemma's "
        "attention trained on in-context rows, made-up-name binding rows among them, beside stage 1's streams "
        "replayed (`configs/gemma-vl-icl.yaml`, 200 steps from gemma-vl; the adapters merged); **quickstart** = the small MetaLM trained from scratch; "
        "**gpt-baseline** = the quickstart's decoder and data without encoders (it never sees images); "
        "**gemma-bare** = Gemma-3-270M alone, inputs as plain text.",
        "",
    ]


def _perception_sections(
    results: dict[str, Any], args: argparse.Namespace, binding: dict[str, Any]
) -> list[str]:
    return [
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
        *(
            [
                "The questions above keep the test split's mix of types (mostly yes/no, few colour "
                f"questions). The k = 4 ≥ k = 0 bar below is judged on {args.per_type} questions of each "
                "type instead, the same at both k, each change with its 95 % interval.",
                "",
            ]
            if getattr(args, "per_type", 0)
            else []
        ),
        "## Fast binding: answers only the demonstrations give",
        "",
        "After Frozen's open-ended miniImageNet: each test image is a query in an episode of 2 (or 5) "
        "classes of one attribute (shape, colour), each class named by a made-up word (dax, blicket, ...) "
        "that appears only in the demonstrations and that no training row ever uses; k demonstrations per "
        "class (an image, the attribute's question, the class's word), shuffled; then the query. Greedy "
        "answer, exact match. Chance 50 % (2-way) / 20 % (5-way); with no demonstrations 0 % by "
        "construction. `-real`: episodes drawn the same way, with the real names. `-text`: episodes drawn the same way, with "
        'each image replaced by its caption before the question ("a blue circle. what shape is in the '
        'image?"), so perception is given and only binding the made-up name is left: for a decoder alone '
        "(gemma-bare) that is the ceiling of its docked model on the image tasks. `X-ranked`: the very "
        "episodes of `X`, answered by whichever of the episode's two names the model finds likelier after "
        "the query (chance 50 %, k = 0 included): binding, without having to spell an unseen word. "
        "`fastbind-shape-2way-ask-color`: the very episodes of `fastbind-shape-2way`, then the query image "
        "asked its colour, right when the model answers the real colour: a model that answers with a "
        "demonstration's word there has learnt that a query always asks what its demonstrations ask.",
        "",
        *_fastbind_rows({**results, **binding}),
        "",
        *_binding_ceiling(binding),
        *_copying_rows({**results, **binding}),
    ]


def _binding_ceiling(binding: dict[str, Any]) -> list[str]:
    """What the decoder alone reaches on the caption-text twin, said next to the bar."""
    by_k = (binding.get("gemma-bare", {}).get("fastbind") or {}).get("fastbind-shape-2way-text", {})
    if "4" not in by_k:
        return []
    k4 = by_k["4"]["mean"]["accuracy"]
    verdict = "below" if k4 < 80 else "at or above"
    return [
        f"Gemma-3 270M alone, reading each image as its caption, binds the made-up shape names at {k4:.1f} % "
        f"with 4 demonstrations per class: {verdict} the 80 % the gemma-vl bar asks, with perfect perception; "
        "gemma-vl keeps that decoder frozen; gemma-vl-icl adapts it (LoRA) on binding rows.",
        "",
    ]


def _text_sections(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    return [
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
        "gemma-vl's text connector starts aligned to Gemma's word embeddings (`align_tokens`: fitted by least "
        'squares before the first step, docs/training.md "Aligning a text connector"); the preset trained from '
        "a random connector before that change is measured in this page's git history (its last version without `align_tokens`). The "
        "quickstart's decoder is trained from scratch, so there are no pretrained word embeddings to align to.",
        "",
    ]


SHOWS_AND_NOT = [
    "## What this shows and what it does not",
    "",
    "- It shows, per attribute and per question type, whether each model uses what its encoders see; an "
    "average alone would hide a model that gets shapes right and colours at chance.",
    "- It does not show the paper's scale: the decoders are the quickstart's (5-11M parameters, by its "
    "width) and Gemma's 270M, trained for minutes on 2 CPU cores, on synthetic shapes and one news corpus.",
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


def write_page(
    results: dict[str, Any],
    args: argparse.Namespace,
    seconds: float,
    variants: dict[str, Any] | None = None,
    binding: dict[str, Any] | None = None,
) -> str:
    """The results page, every number from `results`, `variants` and `binding` (models scored on the
    caption-text fast-binding tasks only), all this script's outputs."""
    return "\n".join(
        [
            *_header(results, args, seconds, binding or {}),
            *_perception_sections(results, args, binding or {}),
            *_text_sections(results, args),
            *bar_sections(results, variants or {}),
            *retrieved_section(results),
            *SHOWS_AND_NOT,
        ]
    )

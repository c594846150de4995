"""Does the language model work as a general-purpose interface? Writes docs/results.md.

Five models, each evaluated the same way:

- **gemma-vl**: the packaged MiniLM and EfficientNet-Lite0 docked onto the frozen packaged Gemma-3-270M
  (`configs/gemma-vl.yaml`);
- **gemma-vl-icl**: gemma-vl with LoRA adapters on Gemma trained on in-context rows (`configs/gemma-vl-icl.yaml`,
  a second stage that starts from runs/gemma-vl/final);
- **quickstart**: the small MetaLM trained from scratch (`configs/quickstart.yaml`);
- **gpt-baseline**: the quickstart's decoder and data with no encoders (`configs/gpt-baseline.yaml`);
- **gemma-bare**: Gemma-3-270M itself, no encoders, every input as plain text (the GPT-style anchor).

Rows: zero-shot captioning with the paper's "Summarize this image:" (CIDEr and per-attribute correctness)
and from the image alone; easy-VQA 0/1/4-shot by question type (and, for the k = 4 >= k = 0 bar, 0/4-shot on
`--per-type` questions of each type, compared question by question); fast binding (made-up names only the
demonstrations give, k = 1/2/4 per class; generated and, on the very same episodes, ranked) with the copy
probe beside it (does the decoder copy a repeat at all; `--copy-training MODEL` also trains a model's decoder
on repeats alone, scripts/copy_training_probe.py); BBC topic in-context learning at k = 0/1/4
with demonstrations through the encoder and as plain text; the paper's frozen-decoder single-task
finetuning on BBC topics (LR 5e-5, batch 32, 3 epochs; per seed); and "does the decoder read the
encoder": held-out loss on the text after a span given encoded / removed / as plain text. The in-context
rows are measured again with each query's demonstrations retrieved like it (`metalm eval --demos similar`,
beside the vote of those demonstrations' answers; `--no-similar` skips them).

Every number on the page comes from this script's own outputs under `--out` (prediction files, summaries,
training runs); a step whose outputs exist is not run again, so an interrupted run resumes (a model under
`--runs` trained from another config or first stage than the one asked for is an error that names what
differs, never reused in silence). `--variants`
adds ablations of a preset (`configs/ablations/<name>.yaml`, e.g. gemma-vl-binding), trained (a second
stage's from its first stage under `--runs`) and evaluated on the in-context rows the same way, a variant with a
text encoder also on BBC topics in context, in a "Tried and left out" table. The page itself is written by
`results_page.py` beside this script.

    python scripts/interface_results.py                       # everything (hours on 2 CPU cores)
    python scripts/interface_results.py --models quickstart --limit 100 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from results_page import FASTBIND_SHOTS, MODELS, VQA_SHOTS, write_page

from metalm.evaluation.breakdown import answer_flips, breakdown_over_seeds, paired_change_by_group
from metalm.evaluation.experiments import cached_eval, load_model, train_once
from metalm.evaluation.prediction_files import prediction_path, read_predictions

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "metalm" / "configs"
PAGE = REPO / "docs" / "results.md"
TRAINED = {
    "gemma-vl": "gemma-vl.yaml",
    "gemma-vl-icl": "gemma-vl-icl.yaml",
    "quickstart": "quickstart.yaml",
    "gpt-baseline": "gpt-baseline.yaml",
}
# A second stage starts from the first stage's model under the same `--runs`.
STARTS_FROM = {"gemma-vl-icl": "gemma-vl"}
FASTBIND_TASKS = (
    "fastbind-shape-2way",
    "fastbind-shape-2way-real",
    "fastbind-color-2way",
    "fastbind-color-5way",
)
# The same episodes with each image given as its caption text: the decoder's own binding, perception taken
# out; every model is scored on them, and `--binding-models` scores only these (gemma-bare: the ceiling).
TEXT_BINDING_TASKS = ("fastbind-shape-2way-text", "fastbind-shape-2way-text-real")
# The same episodes, then the query asked its colour: does binding leave the model answering what it is asked?
ASKING_TASK = "fastbind-shape-2way-ask-color"
# The same episodes scored by which of the episode's names is likelier: binding without spelling the name.
RANKED_BINDING_TASKS = {"image": "fastbind-shape-2way-ranked", "text": "fastbind-shape-2way-text-ranked"}
logger = logging.getLogger("interface_results")


# --- models --------------------------------------------------------------------------------------------
def trained_model(name: str, runs: Path) -> Path:
    """`runs/<name>/final`, trained from its preset unless it exists (a second stage after its first)."""
    first = STARTS_FROM.get(name)
    overrides = [f"init_from={trained_model(first, runs)}"] if first else []
    return train_once(CONFIGS / TRAINED[name], runs / name, overrides)


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
def in_context_results(model, processor, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Easy-VQA by question type at k = 0/1/4 and, for a model that sees images, fast binding."""
    from metalm.evaluation.breakdown import vqa_by_question_type

    kw = {"limit": args.limit, "batch_size": args.batch_size, "progress": True}
    res: dict[str, Any] = {}
    vqa = cached_eval(out / "easyvqa", model, processor, "easyvqa", VQA_SHOTS, args.seeds, **kw)
    res["easyvqa"] = {
        str(k): {
            "all": vqa["results"]["easyvqa"][str(k)]["mean"],
            "by_type": breakdown_over_seeds(out / "easyvqa", "easyvqa", k, vqa_by_question_type),
        }
        for k in VQA_SHOTS
    }
    if args.per_type:  # the by-type bar, judged on as many questions of each type, paired across k
        balanced = out / "easyvqa-by-type"
        kw = {"limit": None, "per_group": args.per_type, "batch_size": args.batch_size, "progress": True}
        cached_eval(balanced, model, processor, "easyvqa", [0, 4], args.seeds, **kw)
        res["easyvqa_by_type"] = paired_change_by_group(balanced, "easyvqa", 0, 4)
        res["easyvqa_flips"] = {t: answer_flips(balanced, "easyvqa", 0, 4, t) for t in res["easyvqa_by_type"]}
    res.update(binding_results(model, processor, out, args))
    return res


def retrieved_results(model, processor, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The in-context rows again with each query's demonstrations chosen like it (`metalm eval --demos
    similar`; one run a k, as retrieval does not depend on the seed): easy-VQA k = 0 -> 4 on the by-type
    bar's questions, and BBC topic through the encoder (when the model has one) and as plain text, each
    with the vote of its retrieved demonstrations' answers (a nearest-neighbour classifier, no decoder)."""
    from metalm.evaluation.demonstrations import demonstration_vote

    kw = {"batch_size": args.batch_size, "progress": True, "demonstrations": "similar"}
    sizes = {"limit": None, "per_group": args.per_type} if args.per_type else {"limit": args.limit}
    vqa = out / "easyvqa-by-type-similar"
    cached_eval(vqa, model, processor, "easyvqa", [0, 4], args.seeds[:1], **sizes, **kw)
    res: dict[str, Any] = {
        "easyvqa_by_type": paired_change_by_group(vqa, "easyvqa", 0, 4),
        "easyvqa_vote": demonstration_vote(read_predictions(prediction_path(vqa, "easyvqa", 4, 0))),
    }
    shots = [k for k in args.bbc_shots if k]
    modes = {"encoded": False, "plain": True} if model.config.encoders_of_kind("text") else {"plain": True}
    for mode, baseline in modes.items():
        bbc = out / f"bbc-topic-{mode}-similar"
        summary = cached_eval(
            bbc,
            model,
            processor,
            "bbc-topic",
            shots,
            args.seeds[:1],
            limit=args.bbc_limit,
            baseline=baseline,
            **kw,
        )
        res[f"bbc-topic-{mode}"] = {
            str(k): {
                "accuracy": summary["results"]["bbc-topic"][str(k)]["mean"]["accuracy"],
                "vote": demonstration_vote(read_predictions(prediction_path(bbc, "bbc-topic", k, 0))),
            }
            for k in shots
        }
    return res


def binding_results(model, processor, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Fast binding: the image tasks for a model that sees images, the caption-text twins for every model,
    each also ranked; and whether the decoder copies at all (the copy probe)."""
    kw = {"limit": args.fastbind_limit, "batch_size": args.batch_size, "progress": True}
    sees = any(s["kind"] == "vision" for s in model.config.encoders)
    res = cached_eval(
        out / "fastbind-text", model, processor, list(TEXT_BINDING_TASKS), FASTBIND_SHOTS, args.seeds, **kw
    )["results"]
    if sees:
        images = cached_eval(
            out / "fastbind", model, processor, list(FASTBIND_TASKS), FASTBIND_SHOTS, args.seeds, **kw
        )
        asking = cached_eval(
            out / "fastbind-ask", model, processor, ASKING_TASK, FASTBIND_SHOTS, args.seeds, **kw
        )
        res = {**images["results"], **asking["results"], **res}
    ranked = [task for kind, task in RANKED_BINDING_TASKS.items() if sees or kind == "text"]
    res.update(
        cached_eval(out / "fastbind-ranked", model, processor, ranked, FASTBIND_SHOTS, args.seeds, **kw)[
            "results"
        ]
    )
    return {"fastbind": res, "copying": copying(out / "copying.json", model, processor)}


def copy_training(folder: Path, out: Path, steps: int) -> dict[str, Any]:
    """scripts/copy_training_probe.py on `folder` for `steps` steps (cached in `out/copy-training.json`)."""
    from copy_training_probe import main as probe

    path = out / "copy-training.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("steps") != steps:
        probe(["--model", str(folder), "--steps", str(steps), "--out", str(path)])
    return json.loads(path.read_text())


def copying(path: Path, model, processor) -> dict[str, Any]:
    """The copy probe's result (metalm.evaluation.copying; cached in `path`)."""
    from metalm.evaluation.copying import copy_probe

    if not path.is_file():
        path.write_text(json.dumps(copy_probe(model, processor), indent=2))
    return json.loads(path.read_text())


def evaluate_variant(name: str, runs: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A preset's ablation (`configs/ablations/<name>.yaml`), trained unless it exists; in-context rows."""
    import yaml

    config = CONFIGS / "ablations" / f"{name}.yaml"
    preset = Path(yaml.safe_load(config.read_text())["extends"]).stem  # the preset it varies
    first = STARTS_FROM.get(preset)  # a second stage's variant starts where that stage does
    overrides = [f"init_from={trained_model(first, runs)}"] if first else []
    model, processor = load_model(train_once(config, runs / name, overrides))
    res = {
        "config": f"configs/ablations/{name}.yaml",
        "preset": preset,
        **in_context_results(model, processor, out, args),
    }
    if model.config.encoders_of_kind("text"):  # a text variant: held-out BBC topics in context too
        res.update(bbc_topic_results(model, processor, out, args))
        res["reads_encoder"] = reads_encoder(out / "reads-encoder.json", model, processor, args)
    return res


def evaluate_model(name: str, folder: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from metalm.evaluation.breakdown import caption_by_attribute

    model, processor = load_model(folder)
    has_text = any(s["kind"] == "text" for s in model.config.encoders)
    kw = {"limit": args.limit, "batch_size": args.batch_size, "progress": True}
    res: dict[str, Any] = {"has_text_encoder": has_text}
    for task in ("easyvqa-caption", "easyvqa-caption-image"):
        summary = cached_eval(out / task, model, processor, task, [0], args.seeds[:1], **kw)
        res[task] = {
            "cider": summary["results"][task]["0"]["mean"].get("CIDEr"),
            "attributes": breakdown_over_seeds(out / task, task, 0, caption_by_attribute),
        }
    res.update(in_context_results(model, processor, out, args))
    res.update(bbc_topic_results(model, processor, out, args))
    if args.similar:
        res["similar"] = retrieved_results(model, processor, out, args)
    if has_text:
        res["reads_encoder"] = reads_encoder(out / "reads-encoder.json", model, processor, args)
    return res


def bbc_topic_results(model, processor, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """BBC topic at `--bbc-shots`, demonstrations through the text encoder (when the model has one) and as
    plain text, with the share of the evaluated articles that always answering the majority topic scores."""
    has_text = bool(model.config.encoders_of_kind("text"))
    kw = {"limit": args.bbc_limit, "batch_size": args.batch_size, "progress": True}
    modes = {"encoded": False, "plain": True} if has_text else {"plain": True}
    topic = {
        mode: cached_eval(
            out / f"bbc-topic-{mode}",
            model,
            processor,
            "bbc-topic",
            args.bbc_shots,
            args.seeds,
            baseline=baseline,
            **kw,
        )["results"]["bbc-topic"]  # fmt: skip
        for mode, baseline in modes.items()
    }
    golds = [r["gold"] for r in read_predictions(prediction_path(out / "bbc-topic-plain", "bbc-topic", 0, 0))]
    return {"bbc-topic": topic, "bbc_majority": 100 * max(golds.count(g) for g in set(golds)) / len(golds)}


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--runs", type=Path, default=REPO / "runs")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "interface-results")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=300, help="easy-VQA questions / images per task")
    p.add_argument(
        "--per-type", type=int, default=300,
        help="easy-VQA questions of each type (colour, shape, yes/no) the k = 4 >= k = 0 bar is judged on; 0: "
        "judge it on the --limit subset",
    )  # fmt: skip
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
    p.add_argument(
        "--variants", nargs="*", default=[], help="ablations to add (configs/ablations/<name>.yaml)"
    )
    p.add_argument(
        "--binding-models",
        nargs="*",
        default=[],
        choices=MODELS,
        help="models scored on the caption-text fast-binding twins only (e.g. gemma-bare: the decoder's ceiling)",
    )
    p.add_argument(
        "--copy-training",
        nargs="*",
        default=[],
        choices=MODELS,
        help="models whose decoder is also trained on repeated random tokens (scripts/copy_training_probe.py)",
    )
    p.add_argument("--copy-training-steps", type=int, default=1500)
    p.add_argument(
        "--no-similar", dest="similar", action="store_false",
        help="skip the rows with demonstrations retrieved like each query (metalm eval --demos similar)",
    )  # fmt: skip
    p.add_argument("--page", type=Path, default=PAGE)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
        if name in args.copy_training:
            results[name]["copy_training"] = copy_training(folder, args.out / name, args.copy_training_steps)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    variants = {name: evaluate_variant(name, args.runs, args.out / name, args) for name in args.variants}
    binding = {}
    for name in args.binding_models:
        model, processor = load_model(model_dir(name, args.runs))
        binding[name] = binding_results(model, processor, args.out / name, args)
    args.page.write_text(write_page(results, args, time.time() - start, variants, binding))
    if "quickstart" in results:
        append_quickstart_run(args.page, args.runs / "quickstart")
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

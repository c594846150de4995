"""The paper's headline claims at small scale: semi-causal (MetaLM) against causal (GPT) pre-training on the
same corpus. Writes docs/paper-claims.md and docs/paper-claims.png from its own outputs.

Three decoders are pre-trained from scratch on `text_corpus` for the same steps (configs/claims-*.yaml):
**metalm** (packaged MiniLM docked, frozen except its last two layers, spans 8-16 tokens at 25 %), **gpt**
(no encoder, plain next-token prediction) and **random-encoder** (metalm with a randomly initialised encoder).
Then, for each model and each seed:

- single-task finetuning on every task (BBC topics, WordNet categories, GCIDE parts of speech) with the
  paper's MNLI protocol: LR 5e-5, batch 32, 3 epochs over 256 examples; MetaLM's decoder frozen, GPT fully
  finetuned;
- the same, scaled so that something is learnt: every model fully finetuned, LR 1e-3, 3 epochs over 768
  examples per task;
- multitask finetuning on the three tasks together, FLAN-style templates with the options written in (the
  inputs through the encoder for MetaLM), LR 1e-3 (the paper's 1e-4 over 20k steps), 1 epoch over 768
  examples per task, decoder + connector + encoder's top layers; greedy answers, exact match;
- in-context learning of the pre-trained model, k = 0/1/4 (demonstration inputs through the encoder for
  MetaLM, plain text for GPT);

and once per model the held-out perplexity of its decoder on the corpus's test split.

    python scripts/paper_claims.py                 # the full comparison (about 2 h on 2 quiet CPU cores)
    python scripts/paper_claims.py --smoke --out /tmp/claims   # every step, a few steps each (~3 min)

Each step's outputs (runs, evaluation summaries) are kept under --out and reused by a rerun; --fresh
starts over. The page states this invocation's run time and, from each step's recorded time
(OUT/eval/<model>/step-seconds.json), what all the steps cost together.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metalm.evaluation.experiments import cached_eval, load_model, train_once

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "metalm" / "configs"
MODELS = {
    "metalm": "claims-metalm.yaml",
    "gpt": "claims-gpt.yaml",
    "random-encoder": "claims-random-encoder.yaml",
}
# task -> (built-in dataset, ranked task (single-task, ICL), FLAN task (multitask), decoder prompt)
TASKS = {
    "bbc": ("bbc_news", "bbc-topic", "bbc-topic-options", "topic:"),
    "wordnet": ("wordnet_category", "wordnet-category", "wordnet-category-options", "category:"),
    "gcide": ("gcide_pos", "gcide-pos", "gcide-pos-options", "part of speech:"),
}
# The paper's protocols (single-task: MNLI; multitask: its 34-dataset mixture).
SINGLE = {"lr": 5e-5, "batch": 32, "epochs": 3}
MULTI = {"lr": 1e-4, "batch": 32, "epochs": 1}
# At this scale the paper's single-task protocol is 24 optimizer steps at LR 5e-5, and in a full run nothing
# learnt the tasks (every model at chance). The scaled protocol trains every model fully (MetaLM: decoder,
# connector and the encoder's trainable layers), at the claims decoders' own pre-training LR over 3x the
# examples, so that the comparison is between models that have learnt something. Multitask runs use it too.
SCALED = {"lr": 1e-3, "examples": 768}
logger = logging.getLogger("paper_claims")


@dataclass
class Budget:
    """How much of everything one invocation runs."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain_steps: int | None = None  # None: the configs' max_steps
    finetune_examples: int = 256  # training examples per task (evenly spaced, so every class stays)
    # Test examples per task after finetuning and for in-context learning; equal, so the k = 0 score of the
    # pre-trained model is on the same examples as the finetuned ones (the subset depends on the limit).
    eval_limit: int = 150
    icl_limit: int = 150
    shots: list[int] = field(default_factory=lambda: [0, 1, 4])
    ppl_documents: int = 300  # test documents for perplexity (their first 255 tokens each)
    batch_size: int = 16  # evaluation batch
    finetune_batch: int | None = None  # None: the protocol's (32); smaller only for the smoke run
    finetune_seq_len: int = (
        128  # positions per finetuning sample: BOS + encoded input (cut to fit) + prompt + label
    )
    finetune_overrides: list[str] = field(default_factory=list)
    single_lr: float = SINGLE["lr"]  # the paper's unless --single-lr
    scaled_lr: float = SCALED["lr"]  # the scaled single-task protocol and multitask finetuning
    scaled_examples: int = SCALED["examples"]  # training examples per task of both
    # The random-encoder row is pre-trained and evaluated (ICL, perplexity) but, by default, not finetuned:
    # the finetuning runs are most of the cost, and the claims compare MetaLM with GPT.
    finetune_models: list[str] = field(default_factory=lambda: ["metalm", "gpt"])
    pretrain_overrides: list[str] = field(default_factory=list)


SMOKE = Budget(
    seeds=[0, 1], pretrain_steps=3, finetune_examples=4, scaled_examples=4, eval_limit=4, icl_limit=4, shots=[0, 1],
    ppl_documents=8, batch_size=8, finetune_batch=4, finetune_seq_len=48, finetune_overrides=["run.eval_batches=1"],
    pretrain_overrides=["data.max_records=400", "optim.warmup_steps=1", "run.eval_every=0", "run.eval_batches=1",
                        "run.save_every=0", "run.log_every=1", "optim.batch_size=4"],
)  # fmt: skip


# --- pre-training and perplexity ------------------------------------------------------------------------
def pretrain(name: str, runs: Path, budget: Budget) -> Path:
    overrides = list(budget.pretrain_overrides)
    if budget.pretrain_steps is not None:
        overrides.append(f"optim.max_steps={budget.pretrain_steps}")
    return train_once(CONFIGS / MODELS[name], runs / name, overrides)


def perplexity(folder: Path, out: Path, budget: Budget) -> dict[str, Any]:
    """Plain next-token perplexity of the decoder (no encoder) on the first 255 tokens of evenly spaced
    text_corpus test documents: the same tokens for every model."""
    import torch

    from metalm.data.builtin import load_builtin
    from metalm.data.segments import TextSegment
    from metalm.evaluation.runner import score_samples

    path = out / "perplexity.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, processor = load_model(folder)
    docs = load_builtin("text_corpus", "test")
    # Documents at evenly spaced character offsets, so each source counts by its volume, not by its number of
    # (short dictionary) documents.
    ends = list(itertools.accumulate(len(d.text) for d in docs))
    offsets = [i * ends[-1] // budget.ppl_documents for i in range(budget.ppl_documents)]
    picked = [docs[i] for i in sorted({bisect.bisect_right(ends, o) for o in offsets})]
    head = [TextSegment([processor.bos_token_id], loss=False)]
    samples = [[*head, TextSegment(processor.tokenize(d.text[:2000])[:255], loss=True)] for d in picked]
    samples = [s for s in samples if len(s[1].ids) >= 8]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), budget.batch_size):
            for logprob, count, _ in score_samples(
                model, processor, samples[start : start + budget.batch_size]
            ):
                total -= logprob
                tokens += count
    result = {
        "documents": len(samples),
        "tokens": tokens,
        "loss": total / tokens,
        "perplexity": math.exp(total / tokens),
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def in_context(folder: Path, out: Path, budget: Budget) -> dict[str, Any]:
    """Ranked accuracy of the pre-trained model for every task and k (k = 0 once, else one draw per seed)."""
    model, processor = load_model(folder)
    results = {}
    for task, (_, ranked, _, _) in TASKS.items():
        summary = cached_eval(out / f"icl-{task}", model, processor, ranked, budget.shots, budget.seeds,
                              limit=budget.icl_limit, batch_size=budget.batch_size, progress=False)  # fmt: skip
        by_k = summary["results"][ranked]
        results[task] = {k: _scores(by_k[k], "accuracy") for k in by_k}
    return results


def _scores(entry: dict[str, Any], metric: str) -> dict[str, Any]:
    """Per-seed scores of one task and k of an evaluation summary, with the number of test examples."""
    seeds = entry["seeds"].values()
    return {"values": [s[metric] for s in seeds], "n": next(iter(seeds))["n"]}


# --- finetuning -----------------------------------------------------------------------------------------
def _steps(examples: int, batch: int, epochs: int) -> int:
    return max(1, math.ceil(epochs * examples / batch))


def _finetune_overrides(
    folder: Path, seed: int, streams: list[dict], examples: int, proto: dict, budget: Budget
) -> list[str]:
    batch = budget.finetune_batch or proto["batch"]
    steps = _steps(examples, batch, proto["epochs"])
    return [
        f"init_from={folder}",
        f"run.seed={seed}",
        f"data.streams={json.dumps(streams)}",
        f"data.seq_len={budget.finetune_seq_len}",
        f"data.max_records={examples // len(streams)}",
        f"optim.lr={proto['lr']}",
        f"optim.batch_size={batch}",
        f"optim.max_steps={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        "run.eval_every=0",
        "run.eval_batches=2",
        "run.save_every=0",
        "run.log_every=10",
        *budget.finetune_overrides,
    ]


def _stream(task: str) -> dict[str, Any]:
    """An instruction stream of `task` whose options are the evaluation task's (a capped training set may
    lack a class, and the options written into FLAN inputs must match the evaluation's)."""
    from metalm.evaluation.tasks import builtin_task

    dataset, ranked = TASKS[task][:2]
    return {
        "name": task,
        "source": dataset,
        "format": "instruction",
        "options": list(builtin_task(ranked).options),
    }


def single_task(
    name: str, folder: Path, runs: Path, out: Path, budget: Budget, protocol: str = "paper"
) -> dict[str, dict[str, Any]]:
    """Single-task finetuning per task and seed. protocol "paper": the paper's (MetaLM's decoder frozen,
    GPT fully trained, LR 5e-5 over `finetune_examples`); "full": every model fully trained at the scaled LR
    over `scaled_examples` (the run and evaluation folders name LR and examples)."""
    frozen = protocol == "paper" and name != "gpt"
    config = CONFIGS / ("finetune-frozen-decoder.yaml" if frozen else "finetune-full.yaml")
    if protocol == "paper":
        examples, proto, tag = budget.finetune_examples, {**SINGLE, "lr": budget.single_lr}, "single"
    else:
        examples, proto = budget.scaled_examples, {**SINGLE, "lr": budget.scaled_lr}
        tag = f"full-lr{budget.scaled_lr:g}-n{examples}"
    scores: dict[str, dict[str, Any]] = {}
    for task, (_, ranked, _, prompt) in TASKS.items():
        scores[task] = {"values": [], "n": 0}
        for seed in budget.seeds:
            stream = {**_stream(task), "template": "{text}", "prompt": prompt}
            overrides = _finetune_overrides(folder, seed, [stream], examples, proto, budget)
            final = train_once(config, runs / f"{name}-{tag}-{task}-s{seed}", overrides)
            model, processor = load_model(final)
            summary = cached_eval(out / f"{tag}-{task}-s{seed}", model, processor, ranked, [0], [seed],
                                  limit=budget.eval_limit, batch_size=budget.batch_size, progress=False)  # fmt: skip
            entry = _scores(summary["results"][ranked]["0"], "accuracy")
            scores[task] = {"values": scores[task]["values"] + entry["values"], "n": entry["n"]}
    return scores


def multitask(name: str, folder: Path, runs: Path, out: Path, budget: Budget) -> dict[str, dict[str, Any]]:
    """All tasks together in their FLAN templates, per seed (decoder, connector and the encoder's trainable
    layers updated); exact match per task."""
    from metalm.evaluation.tasks import builtin_task

    streams = [
        {**_stream(task), "template": builtin_task(flan).input_template}
        for task, (_, _, flan, _) in TASKS.items()
    ]
    examples = budget.scaled_examples * len(TASKS)
    tag = f"multitask-lr{budget.scaled_lr:g}-n{budget.scaled_examples}"
    scores: dict[str, dict[str, Any]] = {task: {"values": [], "n": 0} for task in TASKS}
    for seed in budget.seeds:
        overrides = _finetune_overrides(
            folder, seed, streams, examples, {**MULTI, "lr": budget.scaled_lr}, budget
        )
        final = train_once(CONFIGS / "finetune-multitask.yaml", runs / f"{name}-{tag}-s{seed}", overrides)
        model, processor = load_model(final)
        for task, (_, _, flan, _) in TASKS.items():
            summary = cached_eval(out / f"{tag}-{task}-s{seed}", model, processor, flan, [0], [seed],
                                  limit=budget.eval_limit, batch_size=budget.batch_size, progress=False)  # fmt: skip
            entry = _scores(summary["results"][flan]["0"], "accuracy")
            scores[task] = {"values": scores[task]["values"] + entry["values"], "n": entry["n"]}
    return scores


def run_model(name: str, runs: Path, out: Path, budget: Budget) -> dict[str, Any]:
    """Every measurement of one model, each step timed. `seconds` is this invocation's time per step (about 0
    where its outputs were reused); `compute_seconds` adds up, per step, every invocation that finished it,
    kept in OUT/eval/NAME/step-seconds.json, so that a page written from reused steps still states what the
    whole comparison costs (a step killed half-way loses the time it had spent)."""
    times: dict[str, float] = {}
    ledger = out / name / "step-seconds.json"
    compute = json.loads(ledger.read_text()) if ledger.is_file() else {}

    def timed(step: str, fn, *args):
        start = time.time()
        result = fn(*args)
        times[step] = round(time.time() - start, 1)
        compute[step] = round(compute.get(step, 0.0) + times[step], 1)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps(compute, indent=2))
        return result

    folder = timed("pretrain", pretrain, name, runs, budget)
    result = {
        "perplexity": timed("perplexity", perplexity, folder, out / name, budget),
        "icl": timed("icl", in_context, folder, out / name, budget),
        "pretrain_log": _pretrain_log(runs / name),
    }
    if name in budget.finetune_models:
        result["single"] = timed("single", single_task, name, folder, runs, out / name, budget)
        result["single_full"] = timed(
            "single_full", single_task, name, folder, runs, out / name, budget, "full"
        )
        result["multitask"] = timed("multitask", multitask, name, folder, runs, out / name, budget)
    result["seconds"] = times
    result["compute_seconds"] = compute
    return result


def _pretrain_log(run: Path) -> dict[str, Any]:
    """Steps, tokens, wall time and last losses of a pre-training run, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return {
        "steps": last.get("step"),
        "tokens": last.get("tokens"),
        "elapsed_s": last.get("elapsed_s"),
        "train_loss": last.get("loss"),
        "val_loss": val[-1] if val else None,
    }


def ensure_corpus() -> None:
    """Extract text_corpus from the Debian packages unless it is there (about 3 minutes, counted in the run
    time)."""
    from metalm.data.corpus import build_text_corpus, corpus_dir

    if not (corpus_dir() / "train.jsonl").is_file():
        logger.info("extracting text_corpus into %s", corpus_dir())
        build_text_corpus()


# --- main -----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "paper-claims", help="runs and evaluations")
    p.add_argument(
        "--page", type=Path, default=None, help="default: docs/paper-claims.md (OUT/ with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="every step with a handful of examples and steps")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing its steps")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the configs' max_steps")
    p.add_argument("--finetune-examples", type=int, default=None, help="training examples per task")
    p.add_argument("--eval-limit", type=int, default=None, help="test examples per task after finetuning")
    p.add_argument("--icl-limit", type=int, default=None, help="test examples per task for ICL")
    p.add_argument("--single-lr", type=float, default=None, help=f"single-task LR (paper: {SINGLE['lr']:g})")
    p.add_argument(
        "--scaled-lr",
        type=float,
        default=None,
        help=f"LR of the scaled protocol and multitask (paper: {MULTI['lr']:g})",
    )
    p.add_argument(
        "--scaled-examples", type=int, default=None, help="training examples per task, scaled protocol"
    )
    p.add_argument(
        "--finetune-models",
        nargs="+",
        default=None,
        choices=list(MODELS),
        help="models finetuned (default: metalm gpt)",
    )
    return p.parse_args(argv)


def budget_of(args: argparse.Namespace) -> Budget:
    budget = Budget(**asdict(SMOKE)) if args.smoke else Budget()
    for key in (
        "seeds",
        "pretrain_steps",
        "finetune_examples",
        "eval_limit",
        "icl_limit",
        "single_lr",
        "scaled_lr",
        "scaled_examples",
        "finetune_models",
    ):
        if getattr(args, key) is not None:
            setattr(budget, key, getattr(args, key))
    return budget


def main(argv: Sequence[str] | None = None) -> int:
    from claims_page import write_page  # scripts/claims_page.py (beside this file, so on sys.path)

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    budget = budget_of(args)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    page = args.page or (args.out / "paper-claims.md" if args.smoke else REPO / "docs" / "paper-claims.md")
    runs, evals = args.out / "runs", args.out / "eval"
    start = time.time()
    ensure_corpus()
    results: dict[str, Any] = {}
    for name in args.models:
        results[name] = run_model(name, runs, evals, budget)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    meta = {
        "command": " ".join(
            ["python scripts/paper_claims.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seconds": time.time() - start,
        "budget": asdict(budget),
        "single": SINGLE,
        "multi": MULTI,
        "scaled": SCALED,
        "models": args.models,
        "smoke": args.smoke,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    write_page(results, meta, page)
    print(f"wrote {page} and {page.with_suffix('.png')} in {meta['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

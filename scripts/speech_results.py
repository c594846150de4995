"""Does the model hear? Trains configs/speech.yaml, evaluates it and writes the Results section of docs/speech.md.

Steps, each skipped when its outputs exist under `--out` (an interrupted run resumes):

1. train `configs/speech.yaml` from `--init-from` (default: the preset's own, `runs/quickstart/final`),
   timed, into `<out>/speech`;
2. evaluate the trained model at k = 0 on `easyvqa-spoken` (image + spoken question) and
   `easyvqa-spoken-typed` (the same 500 questions typed), and the init model on the typed ones (what the
   speech run started from), each broken down by question type;
3. typed `easyvqa` at k = 0 and k = 4 (demonstrations in the trained layout), by question type, over
   seeds: what the speech training leaves of the in-context learning the quickstart had;
4. `easyvqa-spoken-transcribe` (WER of the spoken test questions, each clip once) of the trained model;
   with `--transcribe`, also `speech-transcribe` (WER on speech_bbc test) of the trained model, beside Whisper
   tiny.en's own decoder on the same clips (`whisper_anchor.py`, cached in `<out>/whisper-anchor.json`).

Every figure on the page comes from these outputs (`<out>/results.json` collects them); the page's text
around the tables is in this file.

    python scripts/speech_results.py                                  # ~10 min on 2 CPU cores
    python scripts/speech_results.py --init-from /path/to/quickstart/final --transcribe
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalm.evaluation.breakdown import (
    QUESTION_TYPES,
    breakdown_over_seeds,
    read_predictions,
    vqa_by_question_type,
)
from metalm.evaluation.experiments import cached_eval, load_model
from metalm.evaluation.prediction_files import prediction_path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "src" / "metalm" / "configs" / "speech.yaml"
PAGE = REPO / "docs" / "speech.md"
VQA_TASKS = ("easyvqa-spoken", "easyvqa-spoken-typed")
ICL_SHOTS = (0, 4)


def timed_training(init_from: str | None, out: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Train the preset into `out/speech` unless it is there; its wall time and peak memory (a separate
    process, so the memory is the run's own)."""
    record = out / "train.json"
    if record.is_file() and (out / "speech" / "final" / "config.json").is_file():
        return json.loads(record.read_text())
    # A feature cache of its own, so the time includes every frozen encoder's first pass, as on a fresh clone.
    command = [sys.executable, "-m", "metalm", "train", str(PRESET), f"run.output_dir={out / 'speech'}"]
    command += [f"run.feature_cache={out / 'features'}"]
    command += [f"init_from={init_from}"] if init_from else []
    command += list(overrides)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info = {"seconds": time.perf_counter() - start, "peak_gb": peak_kb / 2**20, "command": command[2:]}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info


def timed_eval(folder: Path, out: Path, task: str, limit: int | None) -> dict[str, Any]:
    """`task` at k = 0: the summary, its wall time (recorded the first time) and, for VQA, by type."""
    timing = out / "seconds.json"
    start = time.perf_counter()
    model, processor = load_model(folder)
    summary = cached_eval(out, model, processor, task, [0], [0], limit=limit, progress=False)
    if not timing.is_file():
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
    metrics = summary["results"][task]["0"]["mean"]
    row = {"n": summary["results"][task]["0"]["n"], "seconds": json.loads(timing.read_text())["seconds"]}
    row["score"] = metrics.get("vqa_accuracy", metrics.get("wer"))
    predictions = prediction_path(out, task, 0, 0)
    if "wer" not in metrics:
        row["by_type"] = {
            k: v["accuracy"] for k, v in vqa_by_question_type(read_predictions(predictions)).items()
        }
    return row


def in_context(folder: Path, out: Path, limit: int, seeds: Sequence[int]) -> dict[str, Any]:
    """Typed `easyvqa` at k = 0 and 4 (k = 0 once: it is deterministic), by question type over the seeds."""
    model, processor = load_model(folder)
    summary = cached_eval(
        out, model, processor, "easyvqa", ICL_SHOTS, list(seeds), limit=limit, progress=False
    )
    return {
        str(k): {
            "all": summary["results"]["easyvqa"][str(k)]["mean"]["vqa_accuracy"],
            "n": summary["results"]["easyvqa"][str(k)]["n"],
            "by_type": breakdown_over_seeds(out, "easyvqa", k, vqa_by_question_type),
        }
        for k in ICL_SHOTS
    }


def whisper_anchor(out: Path, limit: int | None, dataset: str = "speech_bbc") -> dict[str, Any]:
    """Whisper tiny.en's own decoder on `dataset`'s test clips (scripts/whisper_anchor.py), timed."""
    path = out / f"whisper-anchor-{dataset}.json"
    if not path.is_file():
        command = [sys.executable, str(Path(__file__).with_name("whisper_anchor.py")), "--out", str(path)]
        command += ["--dataset", dataset]
        start = time.perf_counter()
        subprocess.run(command + ([f"--limit={limit}"] if limit else []), check=True)
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "seconds": time.perf_counter() - start}, indent=1))
    data = json.loads(path.read_text())
    return {"score": data["wer"], "n": data["n"], "seconds": data.get("seconds")}


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_markdown(results: dict[str, Any], command: str) -> str:
    """The Results section: the command, spoken vs typed by question type, WER, run times."""
    spoken, typed, init = results["easyvqa-spoken"], results["easyvqa-spoken-typed"], results["init-typed"]
    train = results["train"]
    types = [t for t in QUESTION_TYPES if t in spoken["by_type"]]
    lines = [
        "## Results",
        "",
        "Written by `scripts/speech_results.py` from its own outputs (training run, prediction files):",
        "",
        "```bash",
        command,
        "```",
        "",
        *textwrap.wrap(
            f"`metalm train configs/speech.yaml` from `{results['init_from']}`: **{train['seconds'] / 60:.1f} "
            f"min** wall clock on 2 shared CPU cores (1 torch thread; start-up, saving and the frozen encoders' "
            f"first pass over every clip and image, into an empty feature cache, included), peak memory "
            f"{train['peak_gb']:.1f} GB. k = 0, all test examples.",
            width=108,
        ),
        "",
        "| easy-VQA test, VQA accuracy | n | " + " | ".join(types) + " | all |",
        "|---|---:|" + "---:|" * (len(types) + 1),
    ]
    rows = [
        ("image + **spoken** question (`easyvqa-spoken`)", spoken),
        ("the same questions **typed** (`easyvqa-spoken-typed`)", typed),
        (f"typed, the model it started from (`{results['init_from']}`)", init),
    ]
    for label, row in rows:
        cells = " | ".join(_f(row["by_type"].get(t)) for t in types)
        lines.append(f"| {label} | {row['n']} | {cells} | {_f(row['score'])} |")
    gaps = {t: typed["by_type"][t] - spoken["by_type"][t] for t in types}
    lines += [
        f"| typed − spoken (points) | | {' | '.join(_f(gaps[t]) for t in types)} | "
        f"{_f(typed['score'] - spoken['score'])} |",
        "",
        f"Evaluation: {_f(spoken['seconds'], 0)} s (spoken), {_f(typed['seconds'], 0)} s (typed).",
    ]
    lines += in_context_markdown(results["in-context"], results["in-context-seeds"])
    heard = results.get("easyvqa-spoken-transcribe")
    lines += ["", "| transcription, WER % (lower is better) | n | WER | time (s) |", "|---|---:|---:|---:|"]
    if heard:
        lines.append(
            f"| `easyvqa-spoken-transcribe`: the spoken test questions (each clip once), this preset "
            f"| {heard['n']} | {_f(heard['score'])} | {_f(heard['seconds'], 0)} |"
        )
    anchor = results.get("whisper-anchor-questions")
    if anchor:
        lines.append(
            f"| `easyvqa-spoken-transcribe`: Whisper tiny.en's own decoder (CTranslate2, greedy) | {anchor['n']} "
            f"| {_f(anchor['score'])} | {_f(anchor['seconds'], 0)} |"
        )
    if "speech-transcribe" in results:
        ours, anchor = results["speech-transcribe"], results.get("whisper-anchor")
        lines.append(
            f"| `speech-transcribe`: speech_bbc test, this preset (no BBC sentences in its training) "
            f"| {ours['n']} | {_f(ours['score'])} | {_f(ours['seconds'], 0)} |"
        )
        if anchor:
            lines.append(
                f"| `speech-transcribe`: Whisper tiny.en's own decoder (CTranslate2, greedy) | {anchor['n']} | {_f(anchor['score'])} | "
                f"{_f(anchor['seconds'], 0)} |"
            )
    return "\n".join(lines) + "\n"


def in_context_markdown(icl: dict[str, Any], seeds: Sequence[int]) -> list[str]:
    """Typed easy-VQA with and without demonstrations, by question type."""
    types = [t for t in QUESTION_TYPES if t in icl["0"]["by_type"]]
    lines = [
        "",
        *textwrap.wrap(
            f"With demonstrations: typed `easyvqa` test, {icl['0']['n']} questions, k = 4 demonstrations in the "
            f"trained layout (mean of seeds {', '.join(map(str, seeds))}; k = 0 is deterministic). The speech "
            "training replays the quickstart's in-context stream (`vqa-in-context`); without it, four "
            "demonstrations cost 8 points (What was tried).",
            width=108,
        ),
        "",
        "| typed easy-VQA, VQA accuracy | " + " | ".join(types) + " | all |",
        "|---|" + "---:|" * (len(types) + 1),
    ]
    for k in map(str, ICL_SHOTS):
        row = icl[k]
        cells = " | ".join(_f(row["by_type"][t]["mean"]) for t in types)
        lines.append(f"| k = {k} | {cells} | {_f(row['all'])} |")
    return lines


def write_section(page: Path, section: str) -> None:
    """Replace `page`'s `## Results` section (up to the next `## ` heading) with `section`."""
    text = page.read_text(encoding="utf-8")
    pattern = re.compile(r"^## Results\n.*?(?=^## )", re.S | re.M)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no '## Results' section followed by another '## ' section")
    page.write_text(pattern.sub(lambda _: section + "\n", text, count=1), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init-from", default=None, help="the model to start from (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("runs/speech-results"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--transcribe", action="store_true", help="also WER, beside Whisper's own decoder")
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument(
        "--icl-limit", type=int, default=500, help="typed easy-VQA questions with demonstrations"
    )
    parser.add_argument("--icl-seeds", default="0,1,2", help="seeds of the demonstrations")
    parser.add_argument("overrides", nargs="*", help="training overrides, e.g. optim.max_steps=200")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    import yaml

    init_from = args.init_from or yaml.safe_load(PRESET.read_text())["init_from"]
    results: dict[str, Any] = {
        "init_from": init_from,
        "train": timed_training(args.init_from, args.out, args.overrides),
    }
    final = args.out / "speech" / "final"
    for task in VQA_TASKS:
        results[task] = timed_eval(final, args.out / "eval" / task, task, args.limit)
    results["init-typed"] = timed_eval(
        Path(init_from), args.out / "eval" / "init-typed", VQA_TASKS[1], args.limit
    )
    results["in-context-seeds"] = [int(s) for s in args.icl_seeds.split(",")]
    results["in-context"] = in_context(
        final, args.out / "eval" / "in-context", args.icl_limit, results["in-context-seeds"]
    )
    heard = "easyvqa-spoken-transcribe"
    results[heard] = timed_eval(final, args.out / "eval" / heard, heard, args.limit)
    results["whisper-anchor-questions"] = whisper_anchor(args.out, args.limit, "speech_easy_vqa")
    if args.transcribe:
        results["speech-transcribe"] = timed_eval(
            final, args.out / "eval" / "transcribe", "speech-transcribe", args.limit
        )
        results["whisper-anchor"] = whisper_anchor(args.out, args.limit)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    command = " ".join(["python scripts/speech_results.py", *(argv if argv is not None else sys.argv[1:])])
    write_section(args.page, results_markdown(results, command))
    print(json.dumps({k: v for k, v in results.items() if k != "train"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

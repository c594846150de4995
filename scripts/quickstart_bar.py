"""The quickstart's in-context bar on the results page: easy-VQA by question type, k = 0 against k = 4.

The quickstart's own report asks 50 questions of each type; the bar (docs/results.md: k = 4 >= k = 0 for
each question type, mean of 3 seeds) is judged here on ``--per-type`` of each (300 by default) over seeds
0, 1, 2 of demonstrations, with the paired change on the very same questions and its 95 % interval, and
the yes/no questions split by what the image answers (whether it has the colour or shape asked about).
Several ``--run`` s (training runs of the same preset, e.g. ``run.seed=1``) are judged on their mean: one
training run says little where two seeds differ by several points.

    python scripts/quickstart_bar.py --run runs/quickstart --run runs/quickstart-s1 --page docs/results.md

Each run's prediction files go under ``RUN/bar`` (``metalm eval RUN/final --task easyvqa --shots 0,4 --seeds
0,1,2 --per-group 300 --out RUN/bar`` writes the same) and are reused when they were asked the same; the
page's block between its markers is rewritten from them (appended when the page has none).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import date
from pathlib import Path

import yaml

from metalm.evaluation.breakdown import QUESTION_TYPES, answer_flips, flips_sentence
from metalm.evaluation.experiments import cached_eval, load_model
from metalm.evaluation.in_context import easy_vqa_questions, in_context_markdown, in_context_table, type_row
from metalm.quickstart import update_results_page

BEGIN = "<!-- quickstart-bar:begin (written by scripts/quickstart_bar.py) -->"
END = "<!-- quickstart-bar:end -->"
SHOTS = (0, 4)
SEEDS = (0, 1, 2)

Table = dict[str, dict[str, dict[str, float]]]


def evaluate_bar(run: Path, per_type: int) -> Path:
    """easy-VQA at k = 0 and 4, ``per_type`` questions of each type, seeds 0-2, into ``run/bar``."""
    out = run / "bar"
    model, processor = load_model(run / "final")  # the quickstart's is small: loaded to learn the cache holds
    cached_eval(out, model, processor, "easyvqa", SHOTS, SEEDS, limit=None, per_group=per_type, batch_size=32)
    return out


def _read(folder: Path) -> Table:
    """The in-context table of one evaluation folder."""
    with tempfile.TemporaryDirectory() as tmp:  # in_context_table reads <dir>/easyvqa
        (Path(tmp) / "easyvqa").symlink_to(folder.resolve())
        return in_context_table(Path(tmp))


def _training_seed(run: Path) -> str:
    config = run / "config.yaml"
    seed = yaml.safe_load(config.read_text()).get("run", {}).get("seed") if config.is_file() else None
    return "?" if seed is None else str(seed)


def verdicts(tables: list[Table]) -> list[str]:
    """One line per question type: the bar (k = 4 at least k = 0, means over the runs' seeds of
    demonstrations, then over the runs) met or not."""
    lines = []
    for qtype in QUESTION_TYPES:
        rows = [row for row in (type_row(t, qtype) for t in tables) if row is not None]
        if not rows:
            continue
        before = statistics.fmean(r["0"]["mean"] for r in rows)
        after = statistics.fmean(r["4"]["mean"] for r in rows)
        changes = [r["change"] for r in rows]
        verdict = "met" if after >= before else "**not met**"
        held = sum(r["4"]["mean"] >= r["0"]["mean"] for r in rows)
        detail = ", ".join(f"{c['mean']:+.1f} ± {c['ci95']:.1f}" for c in changes)
        # A shortfall that one decimal would round away is shown with two.
        d = 2 if after < before and f"{before:.1f}" == f"{after:.1f}" else 1
        lines.append(
            f"- {qtype}: {before:.{d}f} → {after:.{d}f}: {verdict} (change by run {detail}; k = 4 ≥ k = 0 in "
            f"{held} of {len(rows)} runs)"
        )
    return lines


def runs_lines(runs: list[Path], tables: list[Table]) -> list[str]:
    """A row per training run: each type at k = 0 → 4 with the paired change and its 95 % interval."""
    head = " | ".join(f"{q}: k = 0 → 4" for q in QUESTION_TYPES)
    lines = [f"| run | run.seed | {head} |", "|---|---:|" + "---|" * len(QUESTION_TYPES)]
    for run, table in zip(runs, tables, strict=True):
        cells = []
        for qtype in QUESTION_TYPES:
            row = type_row(table, qtype)
            change = row["change"] if row is not None else None
            cells.append(
                f"{row['0']['mean']:.1f} → {row['4']['mean']:.1f} ({change['mean']:+.1f} ± {change['ci95']:.1f})"
                if row is not None and change is not None
                else "–"
            )
        lines.append(f"| `{run}` | {_training_seed(run)} | {' | '.join(cells)} |")
    return lines


def flips_lines(runs: list[Path], tables: list[Table]) -> list[str]:
    """For each run and question type that answers worse with four demonstrations, what the changed answers
    become, and whether they are the demonstrations' answers more often than the right one was shown."""
    out, questions = [], easy_vqa_questions()
    for run, table in zip(runs, tables, strict=True):
        for qtype in QUESTION_TYPES:
            row = type_row(table, qtype)
            if row is None or row["change"] is None or row["change"]["mean"] >= 0:
                continue
            out.append(
                f"`{run}`, {qtype}: {flips_sentence(answer_flips(run / 'bar', 'easyvqa', 0, 4, qtype, questions))}"
            )
    if not out:
        return []
    return [
        "",
        "Where a run answers a type worse with demonstrations, the answers that change (each k = 4 seed against "
        "the k = 0 run, the same questions; a model that copies its demonstrations' answers has the first "
        "count of the brackets well above the second, one whose reading of the query got worse, about the "
        "same): " + "; ".join(out) + ".",
    ]


def bar_section(runs: list[Path], per_type: int) -> list[str]:
    """The page's block: what was run, the first run's table, a row per run, the verdicts on their mean,
    what it shows and what it does not."""
    tables = [_read(run / "bar") for run in runs]
    day = max(date.fromtimestamp((run / "bar" / "summary.json").stat().st_mtime) for run in runs).isoformat()
    command = " ".join(f"--run {run}" for run in runs)
    verdict_lines = verdicts(tables)
    tried = (
        ["", 'What was tried where a bar is not met, and what each variant measured: docs/training.md ("Measured": '
         "its table of variants and the three-run comparisons)."]
        if any("not met" in line for line in verdict_lines)
        else []
    )  # fmt: skip
    return [
        BEGIN,
        f"`python scripts/quickstart_bar.py {command} --per-type {per_type}` on {day}: {len(runs)} training "
        f"run(s) of the quickstart preset (the first one's block is above), {per_type} test questions of each "
        "type, k = 0 and 4 random training-split demonstrations in the trained layout, seeds 0, 1, 2 of "
        "demonstrations (k = 0 is greedy and runs once). Where the quickstart rows of the bars table above "
        "(`scripts/interface_results.py`'s runs) differ, they are of an earlier preset; these are of the runs "
        "named here.",
        "",
        f"`{runs[0]}`:",
        "",
        *in_context_markdown(tables[0], SHOTS),
        "",
        "Every run (paired change ± 95 % interval):",
        "",
        *runs_lines(runs, tables),
        "",
        "The bar, k = 4 at least k = 0 per question type (mean over the seeds of demonstrations, then over "
        "the runs):",
        "",
        *verdict_lines,
        *flips_lines(runs, tables),
        *tried,
        "",
        "It shows whether four demonstrations cost the model anything on each question type, and, in the "
        "yes/no rows after the types, on the questions about a colour or shape the image has (most easy-VQA "
        'yes/no questions ask about one it lacks, so falling back on "no" hides inside the yes/no score). '
        "It does not show learning from demonstrations: easy-VQA is learnt from its training split, so "
        "k = 0 is already high; fast binding (above) is the task only demonstrations solve."
        + (
            " One training run: another training seed of the same preset differs by several points (give "
            "several --run)."
            if len(runs) == 1
            else ""
        ),
        END,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, action="append", help="a quickstart run folder; repeat for training runs of the "
        "same preset (default: runs/quickstart)",
    )  # fmt: skip
    parser.add_argument("--per-type", type=int, default=300, help="questions of each type")
    parser.add_argument("--page", type=Path, default=None, help="the results page to write the block into")
    args = parser.parse_args()
    runs = args.run or [Path("runs/quickstart")]
    for run in runs:
        evaluate_bar(run, args.per_type)
    section = bar_section(runs, args.per_type)
    print("\n".join(section))
    if args.page:
        update_results_page(args.page, section, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()

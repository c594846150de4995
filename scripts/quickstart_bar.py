"""The quickstart's in-context bar on the results page: easy-VQA by question type, k = 0 against k = 4.

The quickstart's own report asks 50 questions of each type; the bar (docs/results.md: k = 4 >= k = 0 for
each question type, mean of 3 seeds) is judged here on ``--per-type`` of each (300 by default) over seeds
0, 1, 2 of demonstrations, with the paired change on the very same questions and its 95 % interval, and
the yes/no questions split by what the image answers (whether it has the colour or shape asked about).

    python scripts/quickstart_bar.py --run runs/quickstart --page docs/results.md

The evaluation's prediction files go under ``RUN/bar`` (``metalm eval RUN/final --task easyvqa --shots 0,4
--seeds 0,1,2 --per-group 300 --out RUN/bar`` writes the same) and are reused when they were asked the same;
the page's block between its markers is rewritten from them (appended when the page has none).
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

from metalm.evaluation.breakdown import QUESTION_TYPES
from metalm.evaluation.experiments import cached_eval, load_model
from metalm.evaluation.in_context import in_context_lines, in_context_table
from metalm.quickstart import update_results_page

BEGIN = "<!-- quickstart-bar:begin (written by scripts/quickstart_bar.py) -->"
END = "<!-- quickstart-bar:end -->"
SHOTS = (0, 4)
SEEDS = (0, 1, 2)


def evaluate_bar(run: Path, per_type: int) -> Path:
    """easy-VQA at k = 0 and 4, ``per_type`` questions of each type, seeds 0-2, into ``run/bar``."""
    out = run / "bar"
    model, processor = load_model(run / "final")  # the quickstart's is small: loaded to learn the cache holds
    cached_eval(out, model, processor, "easyvqa", SHOTS, SEEDS, limit=None, per_group=per_type, batch_size=32)
    return out


def verdicts(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per question type: the bar (mean at k = 4 at least the k = 0 score) met or not."""
    lines = []
    for qtype in QUESTION_TYPES:  # in_context_table's row of a type: "easy-VQA <type> (n=...)"
        by_k = next((v for row, v in table.items() if row.startswith(f"easy-VQA {qtype} (")), None)
        if by_k is None:
            continue
        before, after, change = by_k["0"]["mean"], by_k["4"]["mean"], by_k["change"]
        verdict = "met" if after >= before else "**not met**"
        within = " (within its 95 % interval)" if abs(change["mean"]) <= change["ci95"] else ""
        lines.append(
            f"- {qtype}: {before:.1f} → {after:.1f}, change {change['mean']:+.1f} ± "
            f"{change['ci95']:.1f}{within}: {verdict}"
        )
    return lines


def bar_section(run: Path, bar: Path, per_type: int) -> list[str]:
    """The page's block: what was run, the table, the verdicts, what it shows and what it does not."""
    with tempfile.TemporaryDirectory() as tmp:  # in_context_lines reads <dir>/easyvqa
        (Path(tmp) / "easyvqa").symlink_to(bar.resolve())
        lines = in_context_lines(Path(tmp), shots=SHOTS)
        table = in_context_table(Path(tmp))
    day = date.fromtimestamp((bar / "summary.json").stat().st_mtime).isoformat()
    return [
        BEGIN,
        f"`python scripts/quickstart_bar.py --run {run} --per-type {per_type}` on {day}: the quickstart model "
        f"of `{run}` (its block above), {per_type} test questions of each type, k = 0 and 4 random "
        "training-split demonstrations in the trained layout, seeds 0, 1, 2 of demonstrations (k = 0 is "
        "greedy and runs once).",
        "",
        *lines,
        "",
        "The bar, k = 4 at least k = 0 per question type (mean over the seeds):",
        "",
        *verdicts(table),
        "",
        "It shows whether four demonstrations cost the model anything on each question type, and, in the "
        "yes/no rows after the types, on the questions about a colour or shape the image has (most easy-VQA "
        'yes/no questions ask about one it lacks, so falling back on "no" hides inside the yes/no score). '
        "It does not show learning from demonstrations: easy-VQA is learnt from its training split, so "
        "k = 0 is already high; fast binding (above) is the task only demonstrations solve. One training "
        "run: another training seed of the same preset differs by several points (docs/training.md gives two).",
        END,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a quickstart run folder")
    parser.add_argument("--per-type", type=int, default=300, help="questions of each type")
    parser.add_argument("--page", type=Path, default=None, help="the results page to write the block into")
    args = parser.parse_args()
    bar = evaluate_bar(args.run, args.per_type)
    section = bar_section(args.run, bar, args.per_type)
    print("\n".join(section))
    if args.page:
        update_results_page(args.page, section, begin=BEGIN, end=END)


if __name__ == "__main__":
    main()

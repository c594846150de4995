"""Which part of the demonstrations costs a model on easy-VQA: the same k-shot evaluation under controls.

Where a model answers a question type worse with demonstrations than without (docs/results.md's in-context
bars), the cause may be their answers (a model that copies them, or leans to the answer they show most),
their images (the query's image read against theirs) or their mere presence (the query read worse after any
examples). This evaluates saved models on easy-VQA test questions at k = 0 and k = ``--shots``, the same
questions at each k, under demonstrations that change one thing at a time:

- ``as drawn``: random training-split examples, as ``metalm eval --shots K`` draws them;
- ``shapes removed``: the very same demonstrations (same questions, same answers, same order), each image
  replaced by its background alone: nothing in them to compare the query's image with;
- ``open questions only``: drawn among the colour and shape questions: no yes or no answer is shown;
- ``yes/no questions only``: drawn among the yes/no questions.

Questions are grouped as the results page splits them (colour, shape, and the yes/no questions by what the
image answers: whether it has the colour or shape asked about), ``--per-group`` of each; each cell is
k = 0 → k = K over seeds 0-2 of demonstrations with the paired change and its 95 % interval.

    python scripts/demonstration_controls.py --model runs/quickstart/final --model runs/quickstart-s1/final

Outputs go under ``--out`` (the data, one ``metalm eval`` folder per model and control, reused when present,
and ``controls.md``, the tables printed at the end).
"""

from __future__ import annotations

import argparse
import functools
import json
from datetime import date
from pathlib import Path
from typing import Any

from PIL import Image

from metalm.data.builtin import export_builtin
from metalm.data.layouts import layouts_of
from metalm.evaluation.breakdown import paired_change_by_group, question_type, what_the_image_answers
from metalm.evaluation.experiments import cached_eval, load_model
from metalm.evaluation.own_data import data_tasks, read_own_data

CONTROLS = ("as drawn", "shapes removed", "open questions only", "yes/no questions only")
GROUPS = (
    "colour",
    "shape",
    "yes/no, colour, in the image",
    "yes/no, colour, not in the image",
    "yes/no, shape, in the image",
    "yes/no, shape, not in the image",
)
SEEDS = (0, 1, 2)


def _group(record: dict) -> str:
    kind = question_type(record["answers"])
    if kind != "yes/no":
        return kind
    return f"yes/no, {what_the_image_answers(record['question'], record['answers'])}"


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _shapes_removed(record: dict, root: Path) -> dict:
    """The record with its image replaced by a plain one of the image's background colour."""
    blank = root / "blank" / f"blank-{Path(record['image']).name}"
    if not blank.exists():
        with Image.open(root / record["image"]) as image:
            Image.new("RGB", image.size, image.convert("RGB").getpixel((0, 0))).save(blank)
    return {**record, "image": str(blank.relative_to(root))}


def prepare(root: Path) -> tuple[Path, dict[str, Path]]:
    """The test questions with their group in ``meta.type`` and one training file per control."""
    test_file = export_builtin("easy_vqa_vqa", "test", root)
    train_file = export_builtin("easy_vqa_vqa", "train", root)
    read = lambda path: [json.loads(line) for line in path.read_text().splitlines() if line]  # noqa: E731
    test = [{**r, "meta": {"type": _group(r)}} for r in read(test_file)]
    train = read(train_file)
    (root / "blank").mkdir(exist_ok=True)
    open_ones = [r for r in train if question_type(r["answers"]) != "yes/no"]
    controls = {
        "as drawn": train_file,
        "shapes removed": _write(
            root / "train-shapes-removed.jsonl", [_shapes_removed(r, root) for r in train]
        ),
        "open questions only": _write(root / "train-open.jsonl", open_ones),
        "yes/no questions only": _write(
            root / "train-yes-no.jsonl", [r for r in train if question_type(r["answers"]) == "yes/no"]
        ),
    }
    return _write(root / "test-grouped.jsonl", test), controls


def evaluate(
    model: Any, processor: Any, test: Path, demos: Path, out: Path, shots: int, per_group: int
) -> Path:
    """What ``metalm eval MODEL --data TEST --demo-data DEMOS --shots 0,K --seeds 0,1,2 --per-group N`` does,
    through `cached_eval`: reused when done with the same settings."""
    tasks = data_tasks(test, _examples(test), layouts_of(model.config), _examples(demos), demos)
    cached_eval(
        out, model, processor, tasks, (0, shots), SEEDS, limit=None, per_group=per_group, batch_size=32
    )
    return out


@functools.cache
def _examples(path: Path) -> dict[str, list[Any]]:
    """A records file's examples by kind, read once for every model and control."""
    return read_own_data(path)


def table(model: Path, outs: dict[str, Path], task: str, shots: int) -> list[str]:
    """One row per control: each group's k = 0 → k = K with the paired change and its 95 % interval."""
    lines = [
        f"`{model}`, k = 0 → {shots}:",
        "",
        "| demonstrations | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for control, out in outs.items():
        changes = paired_change_by_group(out, task, 0, shots)
        cells = [
            f"{c['from']:.1f} → {c['to']:.1f} ({c['mean']:+.1f} ± {c['ci95']:.1f})" if c else "–"
            for c in (changes.get(group) for group in GROUPS)
        ]
        lines.append(f"| {control} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, action="append", required=True, help="a saved model; repeatable"
    )
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--per-group", type=int, default=150, help="test questions of each group")
    parser.add_argument("--out", type=Path, default=Path("runs/demonstration-controls"))
    parser.add_argument(
        "--control",
        action="append",
        choices=CONTROLS,
        help="run only these controls (default: all); repeatable",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    test, controls = prepare(args.out / "data")
    lines = [
        f"`python scripts/demonstration_controls.py {' '.join(f'--model {m}' for m in args.model)} --shots "
        f"{args.shots} --per-group {args.per_group}` on {date.today().isoformat()}: easy-VQA test questions, "
        f"{args.per_group} of each group, k = 0 and {args.shots} demonstrations (seeds {', '.join(map(str, SEEDS))}), paired change ± "
        "95 % interval.",
        "",
    ]
    for folder in args.model:
        name = folder.parent.name if folder.name == "final" else folder.name
        model, processor = load_model(folder)  # once for all its controls
        outs = {
            c: evaluate(
                model,
                processor,
                test,
                demos,
                args.out / name / c.replace(" ", "-").replace("/", ""),
                args.shots,
                args.per_group,
            )
            for c, demos in controls.items()
            if c in (args.control or CONTROLS)
        }
        lines += table(folder, outs, test.stem, args.shots)
    (args.out / "controls.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

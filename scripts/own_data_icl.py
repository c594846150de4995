"""Does a finetune on your own records keep in-context learning? Writes docs/own-data-icl.md.

The docs' own-data recipe (docs/training.md, "Finetune a trained model on your own data") on a small image
VQA set unlike easy-VQA, generated here with PIL (1-3 copies of one shape, small or big, all on the left or
the right half; three question types: count, size, side; 1,500 training and 300 test images, three questions
each, the type in `meta.type`). Each variant finetunes `--init-from` for `--steps` steps, then `metalm eval
--data test.jsonl --demo-data train.jsonl --shots 0,4` scores it per question type beside the type's majority
answer (demonstrations drawn at random from the training records), and again at k = 4 with the four training
records most like each question (`--demos similar`), beside the vote of those records' answers:

- **one question a row**: the recipe's stream alone (`{name: mine, source: train.jsonl}`);
- **+ in-context rows**: the same, plus the records as in-context rows (`format: in_context`, 2-6
  demonstrations a row, the layout k-shot evaluation sends);
- each of those again with **slot positions** (`model.connector_positions: {vision: learned}`: a learned
  vector per image slot, zero at first);
- the first two again for `--longer` steps (800 by default): 200 steps is where the recipe starts, not
  where every data set is learnt; and one question a row for `--matched` steps (2,400), about as many trained
  answers as the in-context variant's `--longer` steps.

Beside them, a linear probe of the frozen image slots of `--init-from` per question type (no decoder): what
the features hold, against what the finetuned decoder reads from them.

Every step is skipped when its outputs exist under `--out`.

    python scripts/own_data_icl.py     # ~75 min on 2 CPU cores from nothing (the 200-step variants ~27), from runs/quickstart/final
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "own-data-icl.md"
COUNTS = {1: "one", 2: "two", 3: "three"}
SHOTS, SEEDS = (0, 4), (0, 1, 2)
SIZES = (("train", 1500), ("test", 300))
IN_CONTEXT_ROWS = {"format": "in_context", "in_context": {"shots": [2, 6], "seq_len": 128}}
SLOT_POSITIONS = {"connector_positions": {"vision": "learned"}}
# name -> (streams of the same records beside the recipe's own, `model` overrides of the finetune config)
VARIANTS = {
    "one question a row": ([], {}),
    "+ in-context rows": ([IN_CONTEXT_ROWS], {}),
    "one question a row, slot positions": ([], SLOT_POSITIONS),
    "+ in-context rows, slot positions": ([IN_CONTEXT_ROWS], SLOT_POSITIONS),
}
LONGER = ("one question a row", "+ in-context rows")  # trained again for `--longer` steps


def draw_image(path: Path, rng: random.Random) -> tuple[int, bool, str]:
    """1-3 copies of one shape in one colour, small or big, stacked on the left or the right half."""
    n, big, side = rng.randint(1, 3), rng.random() < 0.5, rng.choice(["left", "right"])
    image = Image.new("RGB", (64, 64), tuple(rng.randint(200, 255) for _ in range(3)))
    draw, colour = ImageDraw.Draw(image), tuple(rng.randint(0, 150) for _ in range(3))
    kind, r = rng.choice(["circle", "square", "triangle"]), rng.randint(9, 11) if big else rng.randint(3, 5)
    rows = [8 + r + k * ((48 - 2 * r) // (n - 1)) for k in range(n)] if n > 1 else [32]
    for y in rows:
        x = (0 if side == "left" else 32) + 16 + rng.randint(-2, 2)
        box = [x - r, y - r, x + r, y + r]
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    image.save(path)
    return n, big, side


def make_dataset(folder: Path, seed: int = 0, sizes: tuple[tuple[str, int], ...] = SIZES) -> None:
    """train.jsonl (1,500 images) and test.jsonl (300), three typed questions an image."""
    if (folder / "test.jsonl").is_file():
        return
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, count in sizes:
        lines = []
        for i in range(count):
            path = folder / "images" / f"{split}-{i}.png"
            n, big, side = draw_image(path, rng)
            for question, answer, kind in (
                ("how many shapes are there?", COUNTS[n], "count"),
                ("what size are the shapes?", "big" if big else "small", "size"),
                ("which side are the shapes on?", side, "side"),
            ):
                image = str(path.relative_to(folder))  # relative to the JSONL file's folder
                record = {"kind": "vqa", "image": image, "question": question, "answers": [answer]}
                lines.append(json.dumps({**record, "meta": {"type": kind}}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def run_variant(
    name: str, extra: list[dict], model: dict, args: argparse.Namespace, steps: int | None = None
) -> dict[str, Any]:
    """Finetune by the recipe (plus `extra` streams of the same records, and `model` overrides) for `steps`
    (default `--steps`), then evaluate at k = 0 and 4, and at k = 4 with retrieved demonstrations."""
    import yaml

    folder = args.out / re.sub(r"[^a-z0-9]+", "-", name.replace("+", "plus")).strip("-")
    train = str(args.out / "data" / "train.jsonl")
    mine = {"name": "mine", "source": train, "validation_fraction": 0.05}
    streams = [mine, *({**mine, "name": f"mine-{i}", **s} for i, s in enumerate(extra))]
    config = {
        "extends": str(REPO / "src" / "metalm" / "configs" / "quickstart.yaml"),
        "init_from": args.init_from,
        **({"model": model} if model else {}),
        "data": {"streams": streams},
        "optim": {"max_steps": steps or args.steps, "lr": args.lr},
        "run": {"output_dir": str(folder / "run")},
    }
    if not (folder / "run" / "final" / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([sys.executable, "-m", "metalm", "train", str(folder / "config.yaml")], check=True)
    by_k = evaluate(folder / "run" / "final", folder / "eval", args, SHOTS, SEEDS)
    retrieved = evaluate(folder / "run" / "final", folder / "eval-similar", args, (4,), (0,), "similar")
    from metalm.evaluation.prediction_files import prediction_path

    votes = vote_by_group(prediction_path(folder / "eval-similar", "test", 4, 0))
    return {"config": config, "by_k": by_k, "similar": {"4": retrieved["4"], "vote": votes}}


def evaluate(model: Path, out: Path, args: argparse.Namespace, shots, seeds, demos: str = "random") -> dict:
    """`metalm eval` of the test records, demonstrations from the training records (skipped when done)."""
    if not (out / "summary.json").is_file():
        data = args.out / "data"
        command = [sys.executable, "-m", "metalm", "eval", str(model), "--out", str(out), "--demos", demos]
        command += ["--data", str(data / "test.jsonl"), "--demo-data", str(data / "train.jsonl")]
        command += ["--shots", ",".join(map(str, shots)), "--seeds", ",".join(map(str, seeds))]
        subprocess.run(command, check=True)
    return next(iter(json.loads((out / "summary.json").read_text())["results"].values()))


def vote_by_group(predictions: Path) -> dict[str, float]:
    """Per question type, how often the answer most of a question's demonstrations show is its gold one."""
    from metalm.evaluation.demonstrations import demonstration_vote
    from metalm.evaluation.prediction_files import read_predictions

    rows = read_predictions(predictions)
    return {
        g: demonstration_vote([r for r in rows if r["group"] == g]) or 0.0 for g in {r["group"] for r in rows}
    }


def probe_by_group(args: argparse.Namespace) -> dict[str, float]:
    """Per question type, what the frozen image slots of `--init-from` hold with no decoder: test accuracy
    of a logistic regression on an image's slot vectors, concatenated (cached in `--out`/probe.json)."""
    cached = args.out / "probe.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch
    from feature_layer_probe import probe_accuracy

    from metalm.evaluation.experiments import load_model

    model, processor = load_model(Path(args.init_from))
    vision = next(s["name"] for s in model.config.encoders if s["kind"] == "vision")
    encoder, prepare = model.encoders[vision].eval(), processor.preprocessors[vision]

    def slots(split: str) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        records = [json.loads(line) for line in (args.out / "data" / f"{split}.jsonl").open()]
        images = sorted({r["image"] for r in records})  # each image is asked one question of every type
        pixels = prepare([Image.open(args.out / "data" / image) for image in images])
        with torch.no_grad():
            vectors = torch.cat([encoder({"pixel_values": p})[0] for p in pixels.split(256)]).flatten(1)
        index = {image: i for i, image in enumerate(images)}
        features, answers = {}, {}
        for group in sorted({r["meta"]["type"] for r in records}):
            rows = [r for r in records if r["meta"]["type"] == group]
            features[group] = vectors[[index[r["image"]] for r in rows]]
            answers[group] = [r["answers"][0] for r in rows]
        return features, answers

    (train_x, train_y), (test_x, test_y) = slots("train"), slots("test")
    probe = {g: probe_accuracy(train_x[g], train_y[g], test_x[g], test_y[g]) for g in test_x}
    cached.write_text(json.dumps(probe, indent=1) + "\n")
    return probe


def page_markdown(
    results: dict[str, Any], command: str, args: argparse.Namespace, longer: dict[str, Any] | None = None
) -> str:
    """The page: what was run, the table by question type, what it shows and what it does not."""
    longer = longer or {}
    groups = sorted(next(iter(results.values()))["by_k"]["0"]["groups"])
    head = "| finetune | k | all | " + " | ".join(groups) + " |"
    lines = [
        "# Your own records: does a finetune keep in-context learning?",
        "",
        f"Written by `scripts/own_data_icl.py` from its own outputs (`{command}`, 2 CPU cores). The recipe of "
        'docs/training.md ("Finetune a trained model on your own data") applied to a small image VQA set '
        "unlike easy-VQA, generated by the script (1-3 copies of one shape, small or big, on the left or the "
        "right half; questions: how many, what size, which side; 1,500 training and 300 test images), from "
        f"`{args.init_from}` for {args.steps} steps at lr {args.lr:g}. Evaluated with `metalm eval RUN "
        f"--data test.jsonl --demo-data train.jsonl --shots 0,4 --seeds {','.join(map(str, SEEDS))}`: VQA "
        "accuracy by question type (k = 4: mean of the seeds' draws of demonstrations from the training "
        "records; k = 0 runs once); `4, retrieved`: the same with `--demos similar --shots 4`, each question "
        "shown the four training records most like it under the model's encoders (one run: retrieval does not "
        "depend on the seed). The vote rows: how often the answer most of those four records give is the gold "
        "one, what they tell with no decoder.",
        "",
        head,
        "|---|---:|---:|" + "---:|" * len(groups),
    ]
    for name, res in {**results, **longer}.items():
        runs = [(k, res["by_k"][k]) for k in map(str, SHOTS)] + [("4, retrieved", res["similar"]["4"])]
        for k, row in runs:
            cells = " | ".join(f"{row['groups'][g]['score']:.1f}" for g in groups)
            lines.append(f"| {name} | {k} | {row['mean']['vqa_accuracy']:.1f} | {cells} |")
    majority = next(iter(results.values()))["by_k"]["0"]["groups"]
    cells = " | ".join(f"{majority[g]['majority_score']:.1f} (`{majority[g]['majority']}`)" for g in groups)
    lines.append(f"| always the type's most common answer | | | {cells} |")
    for name, res in {**results, **longer}.items():
        votes = " | ".join(f"{res['similar']['vote'][g]:.1f}" for g in groups)
        lines.append(f"| vote of the 4 retrieved records ({name}) | | | {votes} |")
    probe = probe_by_group(args)
    cells = " | ".join(f"{probe[g]:.1f}" for g in groups)
    lines.append(f"| linear probe of `{args.init_from}`'s frozen image slots (no decoder) | | | {cells} |")
    lines += ["", *shows(results, probe, longer)]
    return "\n".join(lines) + "\n"


def _points(drop: float) -> str:
    """A score's drop from k = 0 in words: "4.7 points worse", "1.2 points better"."""
    return f"{abs(drop):.1f} points {'worse' if drop > 0 else 'better'}"


def score(by_k: dict[str, Any], k: str, group: str | None) -> float:
    """A variant's score at `k`: of one question type, or of all (`group` None)."""
    return by_k[k]["groups"][group]["score"] if group else by_k[k]["mean"]["vqa_accuracy"]


def drop_from_zero(by_k: dict[str, Any], group: str | None = None) -> float:
    """How much lower a variant scores with four demonstrations than with none (negative: higher)."""
    return score(by_k, "0", group) - score(by_k, "4", group)


def shows(
    results: dict[str, Any], probe: dict[str, float], longer: dict[str, Any] | None = None
) -> list[str]:
    """What the table shows and does not, its figures read from `results` and the slots' `probe`."""
    plain, icl = results["one question a row"]["by_k"], results["+ in-context rows"]["by_k"]

    worst = max(icl["0"]["groups"], key=lambda g: drop_from_zero(icl, g))
    near = results["+ in-context rows"]["similar"]
    beside = ", ".join(
        f"{g} {near['4']['groups'][g]['score']:.1f} / {score(icl, '0', g):.1f} (vote {near['vote'][g]:.1f})"
        for g in sorted(near["vote"])
    )
    worst_clause = (
        f" (its worst type, {worst}, {_points(drop_from_zero(icl, worst))})"
        if drop_from_zero(icl, worst) > 0
        else ""
    )
    at_zero = score(icl, "0", None) - score(plain, "0", None)
    return [
        f"What it shows: finetuned on one question a row, the model answers {_points(drop_from_zero(plain))} with four "
        "demonstrations than without (a prompt of several examples is new to it again); with the same records "
        f"also laid out as in-context rows, {_points(drop_from_zero(icl))}{worst_clause}, and {abs(at_zero):.1f} points "
        f"{'higher' if at_zero >= 0 else 'lower'} at k = 0 than with one question a row"
        + ("" if at_zero >= 0 else " (the same steps are shared by two streams)")
        + ". So the recipe in docs/training.md adds that stream.",
        *steps_paragraph(results, longer),
        "",
        "With the four training records most like each question as its demonstrations, the model with "
        f"in-context rows answers {near['4']['mean']['vqa_accuracy']:.1f} in all against "
        f"{score(icl, '0', None):.1f} with none; by type, retrieved / none (the vote of the retrieved records' "
        f"answers): {beside}. Where the vote is above the model, those records say more than it reads from them.",
        "",
        *positions_paragraph(results, probe, longer),
        "",
        "What it does not show: a larger or a pretrained decoder (this is the quickstart's small one, trained from scratch), other data, or "
        "that random demonstrations *help* here: the question types are fixed and perception decides the answer, "
        "so the best to hope for from them is k = 4 = k = 0. One training run of each variant: finetunes of this "
        "size can differ by many points on one type between training runs (`run.seed`), so a difference of a "
        "few points is not told apart from none.",
    ]


def steps_paragraph(results: dict[str, Any], longer: dict[str, Any] | None) -> list[str]:
    """k = 0 → 4 of each layout at each length it was trained for, and, for the longest run of one question a
    row, its type hurt most by demonstrations against that type's majority answer."""
    if not longer:
        return []

    def by_steps(base: str) -> list[tuple[int, dict[str, Any]]]:
        runs = [results[base], *(r for n, r in longer.items() if n.rsplit(", ", 1)[0] == base)]
        return sorted(((r["config"]["optim"]["max_steps"], r["by_k"]) for r in runs), key=lambda run: run[0])

    def series(base: str) -> str:
        return ", ".join(
            f"{score(by_k, '0', None):.1f} → {score(by_k, '4', None):.1f} at {steps} steps"
            for steps, by_k in by_steps(base)
        )

    steps, plain = by_steps("one question a row")[-1]
    worst = max(plain["0"]["groups"], key=lambda g: drop_from_zero(plain, g))
    majority = plain["0"]["groups"][worst]
    line = (
        "What four demonstrations cost as a finetune trains longer (all types, k = 0 → 4): one question a row "
        f"{series('one question a row')}; with in-context rows {series('+ in-context rows')}."
    )
    if drop_from_zero(plain, worst) > 0:
        line += (
            f" At {steps} steps of one question a row the `{worst}` question falls from "
            f"{score(plain, '0', worst):.1f} to {score(plain, '4', worst):.1f} with demonstrations (always "
            f"answering `{majority['majority']}`: {majority['majority_score']:.1f})."
        )
    return ["", line]


def positions_paragraph(
    results: dict[str, Any], probe: dict[str, float], longer: dict[str, Any] | None
) -> list[str]:
    """Slot positions against none (k = 0), the types no variant reads beyond their majority answer, and
    what the longer runs read."""
    groups = sorted(probe)
    pairs = [
        ("one question a row", "one question a row, slot positions"),
        ("+ in-context rows", "+ in-context rows, slot positions"),
    ]

    def change(group: str) -> str:
        moves = [
            f"{score(results[a]['by_k'], '0', group):.1f} → {score(results[b]['by_k'], '0', group):.1f}"
            for a, b in pairs
        ]
        return f"{group} {' and '.join(moves)}"

    majority = next(iter(results.values()))["by_k"]["0"]["groups"]
    unread = [
        g
        for g in groups
        if all(score(r["by_k"], "0", g) - majority[g]["majority_score"] < 10 for r in results.values())
    ]
    lines = [
        "Slot positions (`model.connector_positions: {vision: learned}` in the finetune config: a learned vector "
        "for each image slot added to the vision connector's outputs, zero at first; docs/docking.md), at k = 0, "
        "without → with, one question a row and with in-context rows: " + "; ".join(map(change, groups)) + "."
    ]
    steps = next(iter(results.values()))["config"]["optim"]["max_steps"]
    for g in unread:
        lines[0] += (
            f" The `{g}` question stays within 10 points of its majority answer in every variant of {steps} steps, "
            f"slot positions included, though the frozen image slots hold it (the probe row: {probe[g]:.1f})."
        )
    for name, res in (longer or {}).items():
        short_name, long_steps = name.rsplit(", ", 1)[0], res["config"]["optim"]["max_steps"]
        row, short = res["by_k"]["0"]["groups"], results[short_name]["by_k"]["0"]["groups"]
        read = ", ".join(
            f"{g} {row[g]['score']:.1f} ({row[g]['score'] - short[g]['score']:+.1f}; probe {probe[g]:.1f})"
            for g in groups
        )
        at_four = ", ".join(
            f"{g} {score(res['by_k'], '0', g):.1f} → {score(res['by_k'], '4', g):.1f}" for g in groups
        )
        lines += [
            "",
            f"Trained longer, {short_name} for {long_steps} steps instead of {steps}: at k = 0 (change from "
            f"{steps} steps; what the frozen slots hold) {read}; with four demonstrations "
            f"{_points(drop_from_zero(res['by_k']))} in all than with none ({at_four}).",
        ]
    if longer:
        lines += [
            "",
            "An in-context row trains the answer of every example in it (3-7), so a step with those rows trains "
            "more answers than a step of one question a row: at equal steps the runs above differ in the answers "
            "trained as well as in the stream; one question a row for three times the steps trains about as many "
            "answers as the in-context variant (where that run is in the table). How many steps a data set needs is "
            "its own; a type far below its probe figure is one the decoder has not yet learnt to read.",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", default="runs/quickstart/final")
    p.add_argument("--out", type=Path, default=Path("runs/own-data-icl"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--longer",
        type=int,
        default=800,
        help="also train these variants this long: " + ", ".join(LONGER) + " (0: no)",
    )
    p.add_argument(
        "--matched",
        type=int,
        default=2400,
        help="also train one question a row this long: about the answers (and the time) of --longer steps with "
        "in-context rows, half of whose rows hold 3-7 trained answers (0: no)",
    )
    p.add_argument("--page", type=Path, default=PAGE)
    args = p.parse_args(argv)
    make_dataset(args.out / "data")
    results = {name: run_variant(name, *VARIANTS[name], args) for name in VARIANTS}
    longer = {
        f"{name}, {args.longer} steps": run_variant(
            f"{name}, {args.longer} steps", *VARIANTS[name], args, steps=args.longer
        )
        for name in (LONGER if args.longer else ())
    }
    if args.longer and args.matched:
        name = f"one question a row, {args.matched} steps"
        longer[name] = run_variant(name, *VARIANTS["one question a row"], args, steps=args.matched)
    (args.out / "results.json").write_text(json.dumps({**results, "longer": longer}, indent=1) + "\n")
    command = " ".join(["python scripts/own_data_icl.py", *(argv if argv is not None else sys.argv[1:])])
    args.page.write_text(page_markdown(results, command, args, longer))
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

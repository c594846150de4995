"""The quickstart pipeline end to end on a reduced size: the real packaged encoders and data, a few steps,
a small evaluation, and every report file."""

from __future__ import annotations

import json

import pytest

from metalm.cli import main


@pytest.mark.slow
def test_quickstart_end_to_end_reduced(tmp_path):
    out = tmp_path / "qs"
    code = main(
        [
            "quickstart",
            "--output-dir", str(out),
            "--max-steps", "6",
            "--eval-limit", "12",
            "optim.batch_size=4",
            "optim.warmup_steps=2",
            "run.eval_every=3",
            "run.eval_batches=1",
            "run.save_every=3",
            "run.log_every=1",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("report.md", "loss_curve.png", "metrics.csv", "metrics.jsonl", "final/model.safetensors"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    for task in ("easyvqa-caption-image", "easyvqa-caption", "easyvqa", "bbc-topic"):
        assert task in report
    assert "Sample captions" in report and "| easy_vqa/test/" in report
    assert "Preset `configs/quickstart.yaml`" in report  # the repository's name, not the install path
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["results"]) == {"easyvqa-caption-image", "easyvqa-caption", "easyvqa", "bbc-topic"}
    chance = json.loads((out / "eval" / "chance.json").read_text())
    assert 0 < chance["easyvqa"]["majority answer"] < 100
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6


def _write_predictions(eval_dir, task, rows):
    eval_dir.mkdir(parents=True, exist_ok=True)
    with open(eval_dir / f"predictions-{task}-k0-s0.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def test_report_breakdown_and_results_page(tmp_path):
    """The report's breakdown and the results-page section come from the prediction files (hand-made here)."""
    from metalm.quickstart import RESULTS_BEGIN, RESULTS_END, breakdown, breakdown_lines, update_results_page

    ev = tmp_path / "eval"
    _write_predictions(ev, "easyvqa", [
        {"id": "q1", "prediction": "red", "gold": ["red"], "score": 1.0},
        {"id": "q2", "prediction": "yes", "gold": ["no"], "score": 0.0},
    ])  # fmt: skip
    caps = [{"id": "i1", "prediction": "a red circle.", "gold": "a red circle."},
            {"id": "i2", "prediction": "a blue circle.", "gold": "a teal circle."}]  # fmt: skip
    _write_predictions(ev, "easyvqa-caption-image", caps)
    _write_predictions(ev, "easyvqa-caption", caps[:1])
    table = breakdown(ev)
    assert table["easyvqa"] == {"colour": {"accuracy": 100.0, "n": 1}, "yes/no": {"accuracy": 0.0, "n": 1}}
    assert table["easyvqa-caption-image"]["colour"] == {"accuracy": 50.0, "n": 2}
    assert table["easyvqa-caption-image"]["shape"] == {"accuracy": 100.0, "n": 2}
    lines = breakdown_lines(table)
    assert any("100.0 (n=1) | – | 0.0 (n=1)" in line for line in lines)
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nhand-written text\n")
    update_results_page(page, [RESULTS_BEGIN, "first", RESULTS_END])
    update_results_page(page, [RESULTS_BEGIN, "second", RESULTS_END])
    text = page.read_text()
    assert "hand-written text" in text and "second" in text and "first" not in text


def test_report_says_when_yes_no_is_answered_from_the_wording():
    """A yes/no attribute below a coin toss on the questions its wording gets wrong is named as answered from
    the wording; none is named when every attribute is at least a coin toss."""
    from metalm.quickstart import breakdown_lines

    def table(colour: float, shape: float) -> dict:
        return {"easyvqa-against-prior": {"yes/no: colour": {"accuracy": colour, "n": 17},
                                          "yes/no: shape": {"accuracy": shape, "n": 28}}}  # fmt: skip

    lines = breakdown_lines(table(0.0, 100.0))
    said = [line for line in lines if line.startswith("Below a coin toss")]
    assert len(said) == 1 and said[0].startswith("Below a coin toss (colour):") and "red shape" in said[0]
    by_image = {"easyvqa-by-image": {"colour, in the image": {"accuracy": 0.0, "n": 17},
                                     "colour, not in the image": {"accuracy": 99.0, "n": 149}}}  # fmt: skip
    rows = [line for line in breakdown_lines(by_image) if line.startswith("| yes/no questions about")]
    assert rows == [
        "| yes/no questions about a colour / shape the image has | VQA accuracy by the attribute asked about | "
        "0.0 (n=17) | – | |",
        "| yes/no questions about a colour / shape the image lacks | VQA accuracy by the attribute asked about | "
        "99.0 (n=149) | – | |",
    ]
    shape_only = [line for line in breakdown_lines(table(60.0, 40.0)) if line.startswith("Below a coin toss")]
    assert shape_only == ["Below a coin toss (shape): the model answers those yes/no questions from their "
                          "wording, not from the image."]  # fmt: skip
    assert not any(line.startswith("Below a coin toss") for line in breakdown_lines(table(50.0, 100.0)))


def test_results_section_dates_the_run_and_describes_its_own_in_context_evaluation(tmp_path, monkeypatch):
    """The section gives the day the run was evaluated (not the day the page is written) and says whether its
    easy-VQA demonstrations were asked per question type or in the test split's mix, as that run did."""
    import os

    from metalm.quickstart import in_context_section, results_section

    ev = tmp_path / "eval"
    _write_predictions(ev, "easyvqa", [{"id": "q1", "prediction": "red", "gold": ["red"], "score": 1.0}])
    summary = {"limit": 300, "results": {"easyvqa": {"0": {"mean": {"vqa_accuracy": 100.0}}}}}
    (ev / "summary.json").write_text(json.dumps(summary))
    os.utime(ev / "summary.json", (1_700_000_000, 1_700_000_000))  # 2023-11-14 (UTC)
    section = results_section(tmp_path, 540.0, 60.0)
    assert "on 2023-11-1" in section[1] and "training 9.0 min, evaluation 1.0 min" in section[1]

    from metalm.evaluation import in_context

    monkeypatch.setattr(in_context, "in_context_lines", lambda folder: ["(the table)"])  # its own tests
    icl = tmp_path / "eval-icl" / "easyvqa"
    icl.mkdir(parents=True)
    (icl / "summary.json").write_text(json.dumps({"per_group": None, "limit": 100}))
    assert "on the test split's mix of types" in " ".join(in_context_section(tmp_path))
    (icl / "summary.json").write_text(json.dumps({"per_group": 50, "limit": None}))
    assert "on the same number of questions of each type" in " ".join(in_context_section(tmp_path))

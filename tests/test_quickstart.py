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
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["results"]) == {"easyvqa-caption-image", "easyvqa-caption", "easyvqa", "bbc-topic"}
    chance = json.loads((out / "eval" / "chance.json").read_text())
    assert 0 < chance["easyvqa"]["majority answer"] < 100
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6

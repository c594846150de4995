"""scripts/quickstart_bar.py: the quickstart's in-context bar, evaluated once and written onto a page."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("quickstart_bar")


def test_bar_block_from_its_own_evaluation_reused_on_a_rerun(script, tiny_saved, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(tiny_saved)
    bar = script.evaluate_bar(run, per_type=2)
    assert sorted(p.name for p in bar.glob("predictions-*.jsonl")) == [
        "predictions-easyvqa-k0-s0.jsonl", *(f"predictions-easyvqa-k4-s{s}.jsonl" for s in (0, 1, 2))
    ]  # fmt: skip
    written = (bar / "summary.json").stat().st_mtime_ns
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nhand-written\n")
    section = script.bar_section(run, bar, 2)
    script.update_results_page(page, section, begin=script.BEGIN, end=script.END)
    script.update_results_page(page, section, begin=script.BEGIN, end=script.END)
    text = page.read_text()
    assert text.count(script.BEGIN) == 1 and "hand-written" in text
    verdicts = [line for line in section if line.startswith("- ")]
    assert [v.split(":")[0] for v in verdicts] == ["- colour", "- shape", "- yes/no"]
    for line in verdicts:  # each verdict follows from its own figures
        before, after = (float(x) for x in line.split(": ", 1)[1].split(", change")[0].split(" → "))
        assert line.endswith(": met") == (after >= before)
    assert "| easy-VQA yes/no (n=2) |" in text
    script.evaluate_bar(run, per_type=2)  # asked the same: the files are reused
    assert (bar / "summary.json").stat().st_mtime_ns == written

"""scripts/quickstart_bar.py: the quickstart's in-context bar, evaluated once and written onto a page."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("quickstart_bar")


def _run(tmp_path, name, model):
    run = tmp_path / name
    run.mkdir()
    (run / "final").symlink_to(model)
    return run


def test_bar_block_from_its_own_evaluation_reused_on_a_rerun(script, tiny_saved, tmp_path):
    run = _run(tmp_path, "run", tiny_saved)
    (run / "config.yaml").write_text("run: {seed: 7}\n")
    bar = script.evaluate_bar(run, per_type=2)
    assert sorted(p.name for p in bar.glob("predictions-*.jsonl")) == [
        "predictions-easyvqa-k0-s0.jsonl", *(f"predictions-easyvqa-k4-s{s}.jsonl" for s in (0, 1, 2))
    ]  # fmt: skip
    written = (bar / "summary.json").stat().st_mtime_ns
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nhand-written\n")
    section = script.bar_section([run], 2)
    script.update_results_page(page, section, begin=script.BEGIN, end=script.END)
    script.update_results_page(page, section, begin=script.BEGIN, end=script.END)
    text = page.read_text()
    assert text.count(script.BEGIN) == 1 and "hand-written" in text
    verdicts = [line for line in section if line.startswith("- ") and " → " in line]
    assert [v.split(":")[0] for v in verdicts] == ["- colour", "- shape", "- yes/no"]
    for line in verdicts:  # each verdict follows from its own figures
        before, after = (float(x) for x in line.split(": ", 1)[1].split(": ")[0].split(" → "))
        assert (": met" in line) == (after >= before)
    assert "| easy-VQA yes/no (n=2) |" in text
    # A bar not met points to what was tried; all met, the block does not.
    assert any("What was tried" in line for line in section) == any("not met" in v for v in verdicts)
    assert f"| `{run}` | 7 |" in text  # the run's row names its training seed
    script.evaluate_bar(run, per_type=2)  # asked the same: the files are reused
    assert (bar / "summary.json").stat().st_mtime_ns == written


def test_several_runs_are_judged_on_their_mean(script, tiny_saved, tmp_path):
    from tests.conftest import build_tiny

    other = tmp_path / "other-model"
    model, processor = build_tiny(seed=1)
    model.save_pretrained(other)
    processor.save_pretrained(other)
    runs = [_run(tmp_path, "a", tiny_saved), _run(tmp_path, "b", other)]
    for run in runs:
        script.evaluate_bar(run, per_type=2)
    section = script.bar_section(runs, 2)
    rows = [line for line in section if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{runs[0]}`", f"| `{runs[1]}`"]
    tables = [script._read(run / "bar") for run in runs]
    for line in (v for v in section if v.startswith("- ")):
        qtype = line[2:].split(":")[0]
        rows = [script.type_row(t, qtype) for t in tables]
        mean = sum(r["4"]["mean"] for r in rows) / 2, sum(r["0"]["mean"] for r in rows) / 2
        assert f"{mean[1]:.1f} → {mean[0]:.1f}" in line
        assert f"in {sum(r['4']['mean'] >= r['0']['mean'] for r in rows)} of 2 runs" in line

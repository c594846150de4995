"""scripts/demonstration_results.py: the page's figures are those of the prediction files it reads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script

TOPICS = ["business", "sport", "tech"]
GOLDS = ["sport", "tech", "business", "sport"]


@pytest.fixture(scope="module")
def script():
    return load_script("demonstration_results")


def _write(folder, k, seed, predictions, demos):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"predictions-bbc-topic-k{k}-s{seed}.jsonl", "w") as fh:
        for i, (pred, gold) in enumerate(zip(predictions, GOLDS)):
            record = {"id": f"a{i}", "prediction": pred, "gold": gold, "score": float(pred == gold)}
            if k:
                record["demonstration_answers"] = [demos[i]]
            fh.write(json.dumps(record) + "\n")


def _write_summary(folder, mode, demonstrations=None):
    """The summary `cached_eval` reuses: what was asked (shots, seeds, limit, calibration, choice of
    demonstrations) and the task it holds."""
    summary = {"shots": [0, 1], "seeds": [0, 1], "limit": 4, "per_group": None, "results": {"bbc-topic": {}}}
    summary["calibration"] = None if mode == "ranked" else "content-free query (N/A), ranked tasks"
    if demonstrations is not None:
        summary["demonstrations"] = demonstrations
    (folder / "summary.json").write_text(json.dumps(summary))


def _outputs(out, args):
    """A model that answers the one demonstration's topic when ranking (right for the two articles whose
    demonstration is of their topic), and once calibrated is right for three of the four articles."""
    demos = ["business", "tech", "sport", "sport"]
    for mode in ("ranked", "calibrated"):
        folder = out / "m" / mode
        _write(folder, 0, 0, ["sport", "sport", "sport", "sport"], demos)
        for seed in (0, 1):
            _write(folder, 1, seed, demos if mode == "ranked" else [*GOLDS[:3], "tech"], demos)
        _write_summary(folder, mode)
        # As plain text: the same at k = 0; at k = 1 ranked copies as well, calibrated is always right.
        plain = out / "m" / f"plain-{mode}"
        plain.mkdir(parents=True)
        for name in folder.iterdir():
            (plain / name.name).write_text(name.read_text())
        for seed in (0, 1):
            _write(plain, 1, seed, demos if mode == "ranked" else GOLDS, demos)


def test_the_page_reads_both_modes_pairs_them_and_breaks_them_down_by_topic(script, tmp_path, monkeypatch):
    out, page = tmp_path / "out", tmp_path / "page.md"
    _outputs(out, None)
    monkeypatch.setattr(script, "load_model", lambda folder: (None, None))  # every output is cached
    argv = ["--model", "m=runs/m/final", "--about", "m=a test model", "--out", str(out), "--page", str(page)]
    argv += ["--limit", "4"]
    assert script.main([*argv, "--shots", "0,1", "--seeds", "0,1", "--plain"]) == 0
    text = page.read_text()
    # k = 0: the same answers both ways; k = 1: ranked 2 of 4 right, calibrated 3 of 4; article by article
    # the differences are +100, 0, +100, -100: +25, and 1.96 standard errors of 95.7 / 2.
    assert "| m | 0 | 50.0 | 50.0 | +0.0 ± 0.0 | — | — |" in text
    # Calibrated k = 1 against calibrated k = 0 (sport for every article: right for a0 and a3): +0, +100,
    # +100, -100 article by article, the same mean and interval.
    assert "| m | 1 | 50.0 ± 0.0 | 75.0 ± 0.0 | +25.0 ± 93.8 | +25.0 ± 93.8 |" in text
    # Ranked answers the demonstration's topic every time, calibrated once (a1); the gold is shown for 2 of 4.
    assert "| 100.0 / 25.0 (50.0) |" in text
    # Per topic at k = 1: sport is half of the articles; ranked answers it half of the time (the two sport
    # demonstrations), right for 1 of its 2 articles; calibrated answers it a quarter of the time, right 1 of 2.
    assert "| m | 1 | sport | 50.0 | 50.0 | 50.0 | 25.0 | 50.0 |" in text
    assert "python scripts/demonstration_results.py --model m=runs/m/final" in text
    assert "**m** = `runs/m/final` (a test model)" in text
    # Encoder against plain text, calibrated: 75 against 100 at k = 1 (-25: the bar is not met), equal at 0.
    assert "| m | 0 | 50.0 | 50.0 | 50.0 | 50.0 | +0.0 ± 0.0 | met |" in text
    assert "| m | 1 | 50.0 ± 0.0 | 50.0 ± 0.0 | 75.0 ± 0.0 | 100.0 ± 0.0 | -25.0 ± 49.0 | not met |" in text


def _similar_outputs(out):
    """Retrieved demonstrations (one run a k): each article's is of its own topic; ranked and calibrated
    both answer it; as plain text the ranked answer is always sport."""
    from metalm.evaluation.retrieval import SIMILARITY

    for plain in ("", "plain-"):
        for mode in ("ranked", "calibrated"):
            folder = out / "m" / f"{plain}similar-{mode}"
            _write(folder, 0, 0, ["sport"] * 4, GOLDS)
            _write(folder, 1, 0, ["sport"] * 4 if plain and mode == "ranked" else GOLDS, GOLDS)
            _write_summary(folder, mode, demonstrations=SIMILARITY)


def test_retrieved_demonstrations_are_read_once_a_k_and_paired_with_the_random_ones(
    script, tmp_path, monkeypatch
):
    out, page = tmp_path / "out", tmp_path / "page.md"
    _outputs(out, None)
    _similar_outputs(out)
    monkeypatch.setattr(script, "load_model", lambda folder: (None, None))  # every output is cached
    argv = ["--model", "m=runs/m/final", "--out", str(out), "--page", str(page), "--limit", "4"]
    assert script.main([*argv, "--shots", "0,1", "--seeds", "0,1", "--plain", "--similar"]) == 0
    text = page.read_text()
    assert "## Demonstrations chosen like the query" in text
    # Ranked: random right for a1 and a3 (both seeds), retrieved for all four: +100, 0, +100, 0 -> +50, and
    # 1.96 standard errors of 57.7 / 2. Calibrated: 3 of 4 -> 4 of 4: +25 ± 1.96 * 50 / 2. The answer is
    # always the retrieved topic, which is always the gold. As plain text ranked says sport (a0 and a3 right):
    # the encoder is +50 above it.
    # The one retrieved demonstration's topic is the gold: its vote is right every time.
    row = "| m | 1 | 50.0 ± 0.0 | 100.0 | +50.0 ± 56.6 | 75.0 ± 0.0 | 100.0 | +25.0 ± 49.0 | 100.0 (100.0) | 100.0 | "
    assert row + "50.0 | +50.0 ± 56.6 (met) |" in text
    assert "| m | 0 | 50.0 | 100.0" not in text  # k = 0 has no demonstrations to choose


def test_the_vote_of_retrieved_demonstrations_takes_the_most_shown_topic_then_the_nearest(script):
    records = [
        {"gold": "tech", "demonstration_answers": ["sport", "tech", "tech"]},  # most shown: tech
        {"gold": "sport", "demonstration_answers": ["tech", "sport"]},  # a tie: the nearest, sport
        {"gold": "tech", "demonstration_answers": ["tech", "sport"]},  # a tie: sport, wrong
    ]
    assert script._vote_accuracy([records]) == pytest.approx(200 / 3)


def test_a_model_must_be_named_and_described_by_its_name(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--model", "runs/m/final", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main(["--model", "m=runs/m/final", "--about", "n=another", "--out", str(tmp_path)])

"""scripts/speech_results.py writes docs/speech.md's Results section from its results: spoken vs typed by
question type, the command at the top, WER beside Whisper's own; the rest of the page is left alone."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("speech_results")


def vqa(score: float, colour: float, shape: float, yes_no: float) -> dict:
    return {"n": 500, "seconds": 20.0, "score": score,
            "by_type": {"colour": colour, "shape": shape, "yes/no": yes_no}}  # fmt: skip


RESULTS = {
    "init_from": "runs/quickstart/final",
    "train": {"seconds": 420.0, "peak_gb": 2.5},
    "easyvqa-spoken": vqa(91.0, 90.0, 95.0, 90.0),
    "easyvqa-spoken-typed": vqa(93.0, 92.0, 99.0, 91.0),
    "init-typed": vqa(94.0, 93.0, 99.0, 92.0),
    "easyvqa-spoken-transcribe": {"n": 300, "seconds": 10.0, "score": 8.0},
    "whisper-anchor-questions": {"n": 300, "seconds": 120.0, "score": 20.0},
    "speech-transcribe": {"n": 200, "seconds": 30.0, "score": 140.0},
    "whisper-anchor": {"n": 200, "seconds": 500.0, "score": 48.0},
    "in-context-seeds": [0, 1, 2],
    "in-context": {
        "0": {
            "all": 93.4,
            "n": 500,
            "by_type": {t: {"mean": m} for t, m in (("colour", 95.2), ("shape", 100.0), ("yes/no", 92.0))},
        },
        "4": {
            "all": 93.1,
            "n": 500,
            "by_type": {t: {"mean": m} for t, m in (("colour", 94.7), ("shape", 100.0), ("yes/no", 91.7))},
        },
    },
}


def test_the_section_holds_the_command_both_inputs_by_type_and_the_wer(script):
    text = script.results_markdown(RESULTS, "python scripts/speech_results.py --transcribe")
    assert text.startswith("## Results\n") and "python scripts/speech_results.py --transcribe" in text
    assert "| colour | shape | yes/no | all |" in text
    assert "| image + **spoken** question (`easyvqa-spoken`) | 500 | 90.0 | 95.0 | 90.0 | 91.0 |" in text
    assert "| typed − spoken (points) | | 2.0 | 4.0 | 1.0 | 2.0 |" in text
    assert (
        "**7.0 min**" in " ".join(text.split())
        and "| 200 | 48.0 | 500 |" in text
        and "| 300 | 8.0 | 10 |" in text
    )
    assert "Whisper tiny.en's own decoder (CTranslate2, greedy) | 300 | 20.0 | 120 |" in text
    assert (
        "| k = 0 | 95.2 | 100.0 | 92.0 | 93.4 |" in text and "| k = 4 | 94.7 | 100.0 | 91.7 | 93.1 |" in text
    )
    assert "mean of seeds 0, 1, 2" in " ".join(text.split())


def test_only_the_results_section_is_replaced(script, tmp_path):
    page = tmp_path / "speech.md"
    page.write_text("# Speech\n\nintro\n\n## Results\n\nold numbers\n\n## Serving\n\nkept\n")
    script.write_section(page, script.results_markdown(RESULTS, "python scripts/speech_results.py"))
    text = page.read_text()
    assert "old numbers" not in text and text.startswith("# Speech\n\nintro\n\n## Results\n")
    assert text.endswith("\n## Serving\n\nkept\n") and "91.0" in text

"""scripts/results_page.py: the fast-binding section lists every binding task a model was scored on, the
ranked twins among them, and the copy probe's figures per model."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def page():
    return load_script("results_page")


@pytest.fixture(scope="module")
def bars():
    return load_script("results_bars")


def _by_k(values: dict[int, float]) -> dict[str, dict]:
    return {str(k): {"mean": {"accuracy": v}, "std": {"accuracy": 0.0}} for k, v in values.items()}


def test_ranked_twins_and_the_copy_probe_are_on_the_page(page):
    results = {
        "small": {
            "fastbind": {"fastbind-shape-2way-ranked": _by_k({1: 50.0, 2: 52.0, 4: 48.0})},
            "copying": {"first_loss": 12.18, "repeat_loss": 12.17, "sequences": 64, "length": 16},
        },
        "large": {
            "fastbind": {"fastbind-shape-2way-ranked": _by_k({1: 90.0, 2: 95.0, 4: 99.0})},
            "copying": {"first_loss": 17.5, "repeat_loss": 2.5, "sequences": 64, "length": 16},
        },
        "no-probe": {"fastbind": {}},
    }
    rows = page._fastbind_rows(results)
    assert "| small | fastbind-shape-2way-ranked | 50.0 | 52.0 | 48.0 |" in rows
    copying = page._copying_rows(results)
    assert "| small | 12.18 | 12.17 | 0.01 |" in copying and "| large | 17.50 | 2.50 | 15.00 |" in copying
    assert (
        not any("no-probe" in line for line in copying) and "64 sequences of 16 random tokens" in copying[0]
    )
    assert page._copying_rows({"no-probe": {}}) == []


def test_the_copy_training_sentence_says_when_copying_began(page):
    probe = {"steps": 100, "length": 16, "vocab": 300, "batch_size": 32, "lr": 1e-3, "chance_loss": 5.70}
    never = {
        **probe,
        "curve": [
            {"step": 50, "repeat_loss": 5.8, "seconds": 30},
            {"step": 100, "repeat_loss": 5.69, "seconds": 60},
        ],
    }
    began = {
        **probe,
        "curve": [
            {"step": 50, "repeat_loss": 5.8, "seconds": 30},
            {"step": 100, "repeat_loss": 1.2, "seconds": 60},
        ],
    }
    text = " ".join(page._copy_training_lines("quickstart", never))
    assert (
        "5.80 at step 50, 5.75 on average over the last 2 checks (steps 50-100), lowest 5.69 (step 100)"
        in text
    )
    assert "lowest 1.20 (step 100)" in " ".join(page._copy_training_lines("quickstart", began))
    assert page._copy_training_lines("quickstart", None) == []


def test_the_by_type_bar_says_whether_a_shortfall_is_beyond_its_interval(bars):
    def change(before, after, ci):
        return {"n": 300, "from": before, "to": after, "mean": after - before, "ci95": ci}

    within = {"colour": change(96.0, 95.5, 1.0), "shape": change(100.0, 100.0, 0.0), "yes/no": change(92.0, 93.0, 1.2)}  # fmt: skip
    row = bars._icl_bars("m", {"easyvqa": {}, "easyvqa_by_type": within})[0]
    assert "300 questions a type" in row and "colour 96.0 → 95.5 (-0.5 ± 1.0)" in row
    assert row.endswith("**not met** (colour 0.5 below k = 0, within its 95 % interval) |")
    beyond = {**within, "colour": change(96.0, 93.0, 1.0)}
    assert "colour 3.0 below k = 0, beyond its 95 % interval" in bars._icl_bars("m", {"easyvqa": {}, "easyvqa_by_type": beyond})[0]  # fmt: skip
    met = {t: change(90.0, 90.0, 0.5) for t in ("colour", "shape", "yes/no")}
    assert bars._icl_bars("m", {"easyvqa": {}, "easyvqa_by_type": met})[0].endswith("| met |")


def test_a_type_that_answers_worse_with_demonstrations_says_what_its_answers_become(bars):
    change = {"colour": {"n": 300, "from": 92.0, "to": 90.0, "mean": -2.0, "ci95": 1.5},
              "shape": {"n": 300, "from": 99.0, "to": 99.0, "mean": 0.0, "ci95": 0.0}}  # fmt: skip
    flips = {
        "colour": {
            "lost": 30,
            "gained": 12,
            "seeds": 3,
            "questions": 300,
            "confusions": [("brown", "red", 11), ("gray", "teal", 6)],
            "copied": 2,
            "gold_shown": 3,
        },  # fmt: skip
        "shape": {
            "lost": 1,
            "gained": 1,
            "seeds": 3,
            "questions": 300,
            "confusions": [("circle", "square", 1)],
        },
    }
    lines = bars._flip_lines({"m": {"easyvqa_by_type": change, "easyvqa_flips": flips}})
    assert (
        "m, colour: over 3 seeds of 300 questions, 30 answers right at k = 0 were wrong at k = 4 and 12"
        in lines[0]
    )
    assert "become brown → red 11, gray → teal 6" in lines[0] and "shape" not in lines[0]
    assert (
        "(2 of the 30 the answer of a demonstration shown before the question; the right answer was shown before 3)"
        in lines[0]
    )
    del flips["colour"]["copied"]  # results written before the count: no clause
    assert (
        "demonstration shown"
        not in bars._flip_lines({"m": {"easyvqa_by_type": change, "easyvqa_flips": flips}})[0]
    )
    assert bars._flip_lines({"m": {"easyvqa": {}}}) == []


def test_a_variant_row_shows_binding_ranked_and_copying_beside_its_preset(bars):
    def entry(ranked, first, repeat):
        return {
            "easyvqa_by_type": {"colour": {"n": 300, "from": 96.0, "to": 95.0, "mean": -1.0, "ci95": 1.2}},
            "fastbind": {
                "fastbind-shape-2way": _by_k({1: 0.0, 4: 2.0}),
                "fastbind-shape-2way-ranked": _by_k({4: ranked}),
                "fastbind-shape-2way-ask-color": _by_k({4: 88.0}),
            },  # fmt: skip
            "copying": {"first_loss": first, "repeat_loss": repeat},
        }

    variants = {
        "qs-copy": {**entry(61.0, 12.5, 12.0), "config": "configs/ablations/qs-copy.yaml", "preset": "qs"}
    }
    rows = bars._variant_rows(variants, {"qs": entry(55.3, 12.18, 12.17)})
    assert (
        rows[2]
        == "| qs | `configs/qs.yaml` | 96.0 → 95.0 (-1.0 ± 1.2) | — | — | 0.0 / 2.0 | 55.3 | 88.0 | 0.01 | — | — |"
    )
    assert (
        rows[3].startswith("| qs-copy | `configs/ablations/qs-copy.yaml` |")
        and "| 61.0 | 88.0 | 0.50 |" in rows[3]
    )


def test_a_variant_row_shows_bbc_topics_in_context_through_the_encoder(bars):
    """A text variant's held-out BBC topics at k = 0 / 1 / 4 (encoded demonstrations) beside the majority share;
    the plain-text figures are not in the cell, and a k it was not measured at shows a dash."""
    colour = {"n": 300, "from": 92.0, "to": 90.0, "mean": -2.0, "ci95": 1.9}
    base = {"easyvqa_by_type": {"colour": colour}, "fastbind": {}, "copying": None}
    topic = {"encoded": _by_k({0: 56.7, 1: 25.6, 4: 34.4}), "plain": _by_k({0: 60.0, 1: 11.0, 4: 12.0})}
    variants = {
        "g-text": {**base, "bbc-topic": topic, "bbc_majority": 33.3, "config": "c.yaml", "preset": "g"},
        "g-one": {
            **base,
            "bbc-topic": {"encoded": _by_k({0: 50.0, 4: 40.0})},
            "config": "d.yaml",
            "preset": "g",
        },
    }
    rows = bars._variant_rows(variants, {})
    assert rows[0].endswith("| BBC topic through the encoder, k = 0 / 1 / 4 (majority topic) |")
    assert rows[2].endswith("| 56.7 / 25.6 / 34.4 (33.3) |") and "11.0" not in rows[2]
    assert rows[3].endswith("| 50.0 / — / 40.0 |")
    assert all(row.count("|") == rows[0].count("|") for row in rows)


def test_the_bars_section_points_at_the_text_in_context_variant_or_says_how_to_add_it(bars):
    text = "\n".join(bars.bar_sections({}, {}))
    assert "`--variants gemma-vl-icl-text` adds it" in text and "Tried and left out" not in text
    colour = {"n": 300, "from": 92.0, "to": 90.0, "mean": -2.0, "ci95": 1.9}
    variant = {
        "easyvqa_by_type": {"colour": colour},
        "fastbind": {},
        "config": "c.yaml",
        "preset": "gemma-vl-icl",
    }
    text = "\n".join(bars.bar_sections({}, {"gemma-vl-icl-text": variant}))
    assert "`gemma-vl-icl-text` below, its BBC column" in text and "## Tried and left out" in text


def test_retrieved_demonstrations_get_their_own_section_beside_their_vote(bars):
    def change(before, after, ci):
        return {"n": 300, "from": before, "to": after, "mean": after - before, "ci95": ci}

    similar = {
        "easyvqa_by_type": {"colour": change(92.0, 93.0, 1.0), "shape": change(100.0, 100.0, 0.0)},
        "easyvqa_vote": 97.5,
        "bbc-topic-encoded": {"1": {"accuracy": 80.0, "vote": 78.0}, "4": {"accuracy": 80.0, "vote": 85.0}},
        "bbc-topic-plain": {"1": {"accuracy": 76.7, "vote": 78.0}, "4": {"accuracy": 86.7, "vote": 85.0}},
    }
    text = "\n".join(bars.retrieved_section({"a": {"similar": similar}, "b": {"easyvqa": {}}}))
    assert "--demos similar" in text and "changes no verdict above" in text
    row = (
        "| a | 92.0 → 93.0 (+1.0 ± 1.0) | 100.0 → 100.0 (+0.0 ± 0.0) | — | 97.5 | 80.0 / 80.0 | 76.7 / 86.7 "
    )
    assert row + "| 78.0 / 85.0 | **not met** |" in text  # k = 4: 80.0 through the encoder, 86.7 as text
    assert "| b |" not in text  # a model evaluated without retrieval has no row
    # Without a text encoder there is no encoded column to judge.
    plain_only = {**similar, "bbc-topic-encoded": {}}
    assert bars.retrieved_section({"q": {"similar": plain_only}})[-2].endswith(
        "| — / — | 76.7 / 86.7 | 78.0 / 85.0 | — |"
    )
    assert bars.retrieved_section({"b": {"easyvqa": {}}}) == []
    # Both at the majority topic: met only vacuously, as the bars table says it.
    at_majority = {
        **similar,
        "bbc-topic-encoded": {"1": {"accuracy": 33.3, "vote": 50.0}, "4": {"accuracy": 33.3, "vote": 56.7}},
        "bbc-topic-plain": {"1": {"accuracy": 33.3, "vote": 50.0}, "4": {"accuracy": 33.3, "vote": 56.7}},
    }
    last = bars.retrieved_section({"q": {"similar": at_majority, "bbc_majority": 33.3}})[-2]
    assert last.endswith(
        "| met only vacuously: both at or below always answering the majority topic (33.3) |"
    )

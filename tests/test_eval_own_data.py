"""Evaluating one's own data (issue #23 items 5, 6 and 8): a JSONL of records evaluated in the model's trained
layout, scores per group with the group's majority baseline, and how scores are printed."""

from __future__ import annotations

from metalm.evaluation.runner import _results_markdown


def _summary(seeds: dict[str, dict[str, float]], metric: str = "vqa_accuracy") -> dict:
    key = {"vqa_accuracy": "vqa_accuracy", "caption": "CIDEr"}[metric]
    values = [m[key] for m in seeds.values()]
    mean = sum(values) / len(values)
    return {
        "model": "m", "mode": "metalm", "seeds": [int(s) for s in seeds], "limit": None,
        "protocols": {"t": {"metric": metric}},
        "results": {"t": {"1": {"seeds": seeds, "mean": {key: mean}, "std": {key: 0.0 if len(values) == 1 else 1.5}, "n": 3}}},
    }  # fmt: skip


def test_one_seed_prints_no_spread():
    table = _results_markdown(_summary({"0": {"vqa_accuracy": 88.3}}))
    assert "| t | vqa_accuracy | 88.3 |" in table and "± 0.0" not in table
    several = _results_markdown(_summary({"0": {"vqa_accuracy": 88.3}, "1": {"vqa_accuracy": 90.0}}))
    assert "89.2 ± 1.5" in several


def test_cider_is_said_not_to_be_on_a_0_100_scale():
    table = _results_markdown(_summary({"0": {"CIDEr": 750.0}}, metric="caption"))
    assert "| t | CIDEr | 750.0 |" in table
    assert "CIDEr-D: 0-1000" in table and "0-100 scale" not in table
